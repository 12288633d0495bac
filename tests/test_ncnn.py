"""NCNN: pnnx conversion of a real (tiny) model, the ncnn runner behind open_runner, parity/bench/upscale
on .param artifacts, the release step, bad input and the missing-package paths."""

from __future__ import annotations

import importlib.util
import json
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
from paragon_export.ncnn_export import _unconverted, export_ncnn
from paragon_export.parity import parity
from paragon_export.release import release
from paragon_export.runners import RuntimeUnavailable, open_runner

needs_ncnn = pytest.mark.skipif(
    importlib.util.find_spec("ncnn") is None or importlib.util.find_spec("pnnx") is None,
    reason="pnnx/ncnn not installed (pip install 'paragon-export[ncnn]')")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ncnn")
    fused = make_model(seed=7, fused=True)
    ckpt = save_model(fused, d / "nano_x2_fused.safetensors", variant="paragonsr2_nano").path
    hr = load_image(sample_photo_paths("eval")[2])[100:190, 120:274]  # coffee, real photo
    lr = bicubic_downscale(hr, 2)[1]  # 45x77: odd and not a multiple of 8
    if importlib.util.find_spec("ncnn") is None or importlib.util.find_spec("pnnx") is None:
        return dict(ckpt=ckpt, fused=fused, lr=lr, dir=d)
    arts = export_ncnn(ckpt, d / "out")
    return dict(ckpt=ckpt, fused=fused, lr=lr, dir=d, arts=arts)


def _run(path, x, **kw):
    r = open_runner(path, threads=1, **kw)
    with r:
        return r.info, next(iter(r.infer(OrderedDict(input=x)).values()))


@needs_ncnn
def test_pnnx_pairs_match_the_fused_model_on_a_photo_at_an_odd_size(pairs):
    out = pairs["dir"] / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        ".paragon-export.json", *(f"paragonsr2_nano_x2_{p}{s}" for p in ("fp16", "fp32") for s in (".bin", ".json", ".param"))]
    x = pairs["lr"].transpose(2, 0, 1)[None].copy()
    assert x.shape == (1, 3, 45, 77)
    with torch.no_grad():
        want = pairs["fused"](torch.from_numpy(x)).numpy()
    err = {}
    for p, art in pairs["arts"].items():
        assert art.meta["verification"]["max_abs"] <= {"fp32": 1e-4, "fp16": 1e-2}[p]
        info, got = _run(art.path, x)
        assert (info.kind, info.runtime, info.precision, info.scale) == ("ncnn", "ncnn", p, 2)
        assert got.shape == want.shape == (1, 3, 90, 154)
        err[p] = float(np.abs(got - want).max())
    assert err["fp32"] < 1e-4
    # fp16 storage really rounds the weights: further from fp32 than fp32 is, within the fp16 limit
    assert 10 * err["fp32"] < err["fp16"] < 1e-2
    # The pair opens through its .bin too; a batch runs image by image.
    info, got2 = _run(pairs["arts"]["fp32"].path.with_suffix(".bin"), np.concatenate([x, x[:, :, ::-1].copy()]))
    assert info.path.suffix == ".param" and got2.shape == (2, 3, 90, 154) and np.abs(got2[0] - want[0]).max() < 1e-4
    meta = json.loads(pairs["arts"]["fp32"].path.with_suffix(".json").read_text())
    assert meta["format"] == "paragon-export/ncnn" and meta["scale"] == 2 and meta["input_blob"] == "in0"


@needs_ncnn
def test_an_fp32_onnx_source_is_verified_against_onnxruntime(tmp_path, pairs):
    onnx_path = export_onnx_file(pairs["fused"], tmp_path / "m.onnx", scale=2)
    arts = export_ncnn(onnx_path, tmp_path / "o", precisions=("fp32",))
    v = arts["fp32"].meta["verification"]
    assert "ONNX Runtime" in v["reference"] and v["max_abs"] < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o"]  # nothing of pnnx's beside the source


@needs_ncnn
def test_parity_bench_and_upscale_take_param_artifacts(tmp_path, pairs):
    p32, p16 = pairs["arts"]["fp32"].path, pairs["arts"]["fp16"].path
    rep = parity([pairs["ckpt"], p32, p16], tmp_path / "p", png_crops=0, sizes="45x77")
    rows = {a.name: a for a in rep.artifacts if a.runner == "ncnn-cpu"}
    assert rep.passed and set(rows) == {p32.name, p16.name} and "ncnn" in rep.tool_versions
    assert rows[p32.name].status == "pass" and rows[p32.name].summary.max_abs < 1e-4
    assert rows[p16.name].precision == "fp16" and rows[p16.name].limits.max_abs == 1e-2

    img = tmp_path / "in.png"
    Image.fromarray((pairs["lr"] * 255).round().astype(np.uint8)).save(img)
    outs = {}
    for name, art in (("torch", pairs["ckpt"]), ("ncnn", p32)):
        r = CliRunner().invoke(main, ["upscale", str(art), str(img), "-o", str(tmp_path / f"{name}.png"),
                                      "--threads", "1", "--tile", "32", "--overlap", "8"])
        assert r.exit_code == 0, r.output
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), np.int16)
    assert outs["ncnn"].shape == (90, 154, 3) and np.abs(outs["ncnn"] - outs["torch"]).max() <= 1

    js = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(pairs["ckpt"]), str(p32), "--sizes", "32x32", "--threads", "1",
                                  "--runs", "2", "--warmup", "1", "--json", str(js)])
    assert r.exit_code == 0, r.output
    results = json.loads(js.read_text())["results"]
    rows = {(x["name"], x["runtime"], x["precision"]) for x in results}
    assert rows == {("nano_x2_fused.safetensors", "torch", "fp32"), (p32.name, "ncnn", "fp32")}
    # the pair's MACs per LR pixel (counted on its ONNX at export) match the fused checkpoint's own count
    macs = {x["runtime"]: x["macs_per_lr_pixel"] for x in results}
    assert macs["ncnn"] and abs(macs["ncnn"] - macs["torch"]) <= 0.02 * macs["torch"], macs


@needs_ncnn
def test_cli_bad_input_and_force_ownership_are_one_line(tmp_path, pairs):
    out = pairs["dir"] / "out"

    def cli(*args):
        r = CliRunner().invoke(main, ["ncnn", *map(str, args)])
        assert r.exit_code != 0 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
        return r.output

    assert "does not exist" in cli(tmp_path / "missing.safetensors", "-o", tmp_path / "x")
    assert "unknown artifact type" in cli(tmp_path / "m.txt", "-o", tmp_path / "x")
    assert "ncnn converts a checkpoint or an fp32 .onnx" in cli(pairs["arts"]["fp32"].path, "-o", tmp_path / "x")
    assert "already exists (use --force" in cli(pairs["ckpt"], "-o", out)
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "paragonsr2_nano_x2_fp32.param").write_text("mine")
    assert "not written by paragon-export" in cli(pairs["ckpt"], "-o", foreign, "--force")
    assert (foreign / "paragonsr2_nano_x2_fp32.param").read_text() == "mine"


def test_leftover_pnnx_operators_are_named(tmp_path):
    # What pnnx's TorchScript route leaves for the Magic upsampler's second replicate pad.
    p = tmp_path / "m.param"
    p.write_text("7767517\n3 3\nInput in0 0 1 in0\nF.pad F.pad_24 1 1 in0 1\nConvolution c 1 1 1 out0 0=3\n")
    assert _unconverted(p) == ["F.pad"]


def test_missing_packages_give_the_install_hint_and_a_skipped_row(tmp_path, pairs, monkeypatch):
    p = tmp_path / "m.param"
    p.write_text("7767517\n")
    (tmp_path / "m.bin").write_bytes(b"\0")
    real = runners.runtime_unavailable
    monkeypatch.setattr(runners, "runtime_unavailable",
                        lambda rt: "ncnn is not installed (pip install 'paragon-export[ncnn]')" if rt == "ncnn" else real(rt))
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'paragon-export\[ncnn\]'"):
        open_runner(p)
    rep = parity([pairs["ckpt"], p], tmp_path / "par", png_crops=0, sizes="45x77")
    row = next(a for a in rep.artifacts if a.runner == "ncnn-cpu")
    assert rep.passed and row.status == "skipped" and "paragon-export[ncnn]" in row.reasons[0]

    monkeypatch.setitem(sys.modules, "pnnx", None)  # `import pnnx` raises ImportError
    with pytest.raises(ParagonError, match=r"pnnx is not installed \(pip install 'paragon-export\[ncnn\]'\)"):
        export_ncnn(pairs["ckpt"], tmp_path / "o")
    r = CliRunner().invoke(main, ["ncnn", str(pairs["ckpt"]), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "paragon-export[ncnn]" in r.output and "Traceback" not in r.output
    with pytest.raises(ParagonError, match=r"--ncnn needs pnnx and ncnn: pnnx not installed"):
        release(pairs["ckpt"], tmp_path / "rel0", ncnn=True, progress=print)
    lines = []
    release(pairs["ckpt"], tmp_path / "rel", precisions=("fp32",), engine=False, progress=lines.append)
    assert any(ln.startswith("ncnn: skipped (pnnx not installed") for ln in lines)
    assert "ncnn" not in json.loads((tmp_path / "rel" / "manifest.json").read_text())["steps"]


@needs_ncnn
def test_release_writes_verified_ncnn_pairs_and_parity_rows(tmp_path, pairs):
    out = tmp_path / "rel"
    lines = []
    # fp32 only, for test time: the fp16 pair's parity row is test_parity_bench_and_upscale_take_param_artifacts's
    release(pairs["ckpt"], out, precisions=("fp32",), engine=False, progress=lines.append)
    m = json.loads((out / "manifest.json").read_text())
    kinds = {a["kind"]: a for a in m["steps"]["ncnn"]["artifacts"]}
    assert set(kinds) == {"ncnn-fp32", "ncnn-fp32-bin", "ncnn-fp32-json"}
    assert kinds["ncnn-fp32"]["parent"] == "paragonsr2_nano_x2_fp32_op17.onnx" and kinds["ncnn-fp32"]["meta"]["max_abs"] < 1e-4
    report = json.loads((out / "parity" / "parity.json").read_text())
    rows = [a for a in report["artifacts"] if a["runner"] == "ncnn-cpu"]
    assert report["passed"] and [a["precision"] for a in rows] == ["fp32"]
    assert all(a["status"] == "pass" and a["gated"] for a in rows)
    listed = {a["path"] for s in m["steps"].values() for a in s["artifacts"]}
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert files == listed | {"manifest.json", "MODEL_CARD.md"}  # no pnnx side file anywhere
    assert "ncnn/paragonsr2_nano_x2_fp32.param" in (out / "MODEL_CARD.md").read_text()
    again = []
    release(pairs["ckpt"], out, precisions=("fp32",), engine=False, progress=again.append)
    assert any("ncnn: unchanged, skipped" in ln for ln in again)
