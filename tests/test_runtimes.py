"""One way to open an artifact (runners.open_runner, one suffix table) and the OpenVINO runtime
behind it: upscale/bench --runtime, parity's runtime rows, missing-runtime handling."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import export_onnx_file, make_model
from paragon_export import runners
from paragon_export.checkpoint import save_model
from paragon_export.cli import main
from paragon_export.errors import ParagonError
from paragon_export.images import bicubic_downscale, load_image, sample_photo_paths
from paragon_export.parity import parity
from paragon_export.runners import RuntimeUnavailable, artifact_kind, open_runner, resolve_runtime

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino not installed (pip install 'paragon-export[openvino]')")


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    torch.manual_seed(0)
    m = make_model()
    ckpt = save_model(m, d / "nano_x2.safetensors", variant="paragonsr2_nano").path
    fused = m.fuse_for_release().eval()
    onnx_path = export_onnx_file(fused, d / "nano_x2_fp32.onnx", scale=2)
    hr = load_image(sample_photo_paths("eval")[1])[60:204, 100:300]  # chelsea, real photo
    lr = bicubic_downscale(hr, 2)[1]
    return dict(ckpt=ckpt, onnx=onnx_path, fused=fused, lr=lr, dir=d)


def test_one_suffix_table(tmp_path, arts):
    assert [artifact_kind(p) for p in ("a.safetensors", "a.PTH", "a.onnx", "a.plan", "a.param")] == \
        ["checkpoint", "checkpoint", "onnx", "engine", "ncnn"]
    (tmp_path / "m.param").write_text("7767517\n")
    (tmp_path / "m.bin").write_bytes(b"\0")
    assert artifact_kind(tmp_path / "m.bin") == "ncnn"  # NCNN weights, not a torch .bin
    with pytest.raises(ParagonError, match=r"unknown artifact type '\.txt'.*onnx"):
        artifact_kind("x.txt")
    assert resolve_runtime(arts["onnx"], "openvino") == "openvino"
    with pytest.raises(ParagonError, match="runs on torch, not openvino"):
        resolve_runtime(arts["ckpt"], "openvino")
    r = open_runner(arts["ckpt"])
    assert (r.info.kind, r.info.runtime, r.info.precision, r.info.scale) == ("checkpoint", "torch", "fp32", 2)
    r = open_runner(arts["onnx"])
    assert (r.info.kind, r.info.runtime, r.info.precision, r.info.scale) == ("onnx", "onnxruntime", "fp32", 2)


def test_missing_runtime_is_one_line_and_parity_skips_it(tmp_path, arts, monkeypatch):
    real = runners.runtime_unavailable
    monkeypatch.setattr(runners, "runtime_unavailable",
                        lambda rt: "openvino is not installed (pip install 'paragon-export[openvino]')"
                        if rt == "openvino" else real(rt))
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'paragon-export\[openvino\]'"):
        open_runner(arts["onnx"], "openvino")
    rep = parity([arts["ckpt"], arts["onnx"]], tmp_path / "p", png_crops=0)
    row = next(a for a in rep.artifacts if a.runner == "openvino-cpu")
    assert rep.passed and row.status == "skipped" and "paragon-export[openvino]" in row.reasons[0]
    # Required but missing: an error row, and the gate fails.
    rep = parity([arts["ckpt"], arts["onnx"]], tmp_path / "q", png_crops=0, require=("openvino",))
    row = next(a for a in rep.artifacts if a.runner == "openvino-cpu")
    assert not rep.passed and row.status == "error" and row.gated
    img = tmp_path / "in.png"
    Image.fromarray((arts["lr"] * 255).round().astype(np.uint8)).save(img)
    for art, msg in ((arts["onnx"], "openvino is not installed"), (arts["ckpt"], "runs on torch, not openvino")):
        r = CliRunner().invoke(main, ["upscale", str(art), str(img), "-o", str(tmp_path / "o"), "--runtime", "openvino"])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output


@needs_openvino
def test_openvino_runner_matches_torch_on_a_photo(arts):
    x = arts["lr"].transpose(2, 0, 1)[None].copy()
    with torch.no_grad():
        want = arts["fused"](torch.from_numpy(x)).numpy()
    r = open_runner(arts["onnx"], "openvino", threads=1)
    with r:
        got = next(iter(r.infer(OrderedDict(input=x)).values()))
        assert r.last_inference_time() > 0
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


@needs_openvino
def test_parity_rows_upscale_and_bench_on_openvino(tmp_path, arts):
    rep = parity([arts["ckpt"], arts["onnx"]], tmp_path / "p", png_crops=0, require=("openvino",))
    row = next(a for a in rep.artifacts if a.runner == "openvino-cpu")
    assert rep.passed and row.role == "runtime" and row.status == "pass" and row.gated
    assert row.summary.max_abs < 1e-4 and "openvino" in rep.tool_versions
    md = (tmp_path / "p" / "parity.md").read_text()
    assert "openvino-cpu PASS" in md

    img = tmp_path / "in.png"
    Image.fromarray((arts["lr"] * 255).round().astype(np.uint8)).save(img)
    outs = {}
    for rt in ("onnxruntime", "openvino"):
        r = CliRunner().invoke(main, ["upscale", str(arts["onnx"]), str(img), "-o", str(tmp_path / f"{rt}.png"),
                                      "--runtime", rt, "--threads", "1", "--tile", "48", "--overlap", "8"])
        assert r.exit_code == 0, r.output
        outs[rt] = np.asarray(Image.open(tmp_path / f"{rt}.png"), np.int16)
    assert outs["openvino"].shape == (144, 200, 3) and np.abs(outs["openvino"] - outs["onnxruntime"]).max() <= 1

    js = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(arts["ckpt"]), str(arts["onnx"]), "--sizes", "32x32", "--threads", "1",
                                  "--runs", "2", "--warmup", "1", "--runtime", "onnxruntime", "--runtime", "openvino",
                                  "--json", str(js)])
    assert r.exit_code == 0, r.output
    rows = {(x["name"], x["runtime"]) for x in json.loads(js.read_text())["results"]}
    assert rows == {("nano_x2.safetensors", "torch"), ("nano_x2_fp32.onnx", "onnxruntime"),
                    ("nano_x2_fp32.onnx", "openvino")}


def test_import_loads_no_optional_runtime():
    code = ("import sys, paragon_export, paragon_export.runners, paragon_export.parity, paragon_export.upscale, "
            "paragon_export.bench\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'openvino', 'ncnn', 'tensorrt', 'modelopt', 'spandrel'})\n"
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
