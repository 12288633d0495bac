"""`bench`: one small size, two runs; the report's fields, ratios and errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from paragon_export.bench import bench
from paragon_export.checkpoint import save_model
from paragon_export.cli import main

from conftest import export_onnx_file, make_model

RESULT_FIELDS = {"artifact", "name", "runtime", "form", "precision", "scale", "size", "input_hw", "output_hw", "runs",
                 "median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "throughput_img_s", "throughput_out_mpix_s",
                 "peak_rss_mib", "memory_method", "baseline", "speedup_vs_eager"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    m = make_model()
    unfused = save_model(m, d / "nano.safetensors", variant="paragonsr2_nano").path
    fused = m.fuse_for_release().eval()
    onnx_fp32 = export_onnx_file(fused, d / "nano_fp32.onnx", scale=2)
    # A dynamically quantized copy: the precision label comes from the graph (ConvInteger ops).
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(onnx_fp32), str(d / "nano_int8.onnx"))
    return dict(unfused=unfused, onnx=onnx_fp32, int8=d / "nano_int8.onnx", dir=d)


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_report_fields_and_ratios(artifacts):
    out = artifacts["dir"] / "bench.json"
    arts = [artifacts["onnx"], artifacts["unfused"], artifacts["int8"]]
    report = bench(arts, sizes=[(24, 40)], threads=1, runs=2, warmup=1, json_path=out)
    assert json.loads(out.read_text()) == report
    assert report["format"] == "paragon-export/bench" and report["settings"]["threads"] == 1
    assert report["baseline"]["artifact"] == str(artifacts["unfused"])  # the unfused checkpoint, wherever listed
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["nano_fp32.onnx", "nano.safetensors", "nano_int8.onnx"]
    for r in rows.values():
        assert RESULT_FIELDS <= set(r)
        assert r["runs"] == 2 and r["size"] == "24x40" and r["output_hw"] == [48, 80]
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
        assert r["throughput_img_s"] == pytest.approx(1000 / r["median_ms"])
        assert r["throughput_out_mpix_s"] == pytest.approx(48 * 80 / r["median_ms"] / 1e3)
        assert r["peak_rss_mib"] >= 0
        if sys.platform == "linux":
            assert r["memory_method"] == "VmHWM"
    base = rows["nano.safetensors"]
    assert base["baseline"] and base["speedup_vs_eager"] == 1.0 and base["form"] == "eager unfused"
    for name in ("nano_fp32.onnx", "nano_int8.onnx"):
        assert rows[name]["speedup_vs_eager"] == pytest.approx(base["median_ms"] / rows[name]["median_ms"])
    assert [rows[n]["precision"] for n in rows] == ["fp32", "fp32", "int8"]
    assert rows["nano_fp32.onnx"]["runtime"] == "onnxruntime"
    # The int8 artifact really runs: its output is close to, but not equal to, fp32's.
    from paragon_export.upscale import open_model

    x = np.random.default_rng(0).random((1, 3, 24, 40), dtype=np.float32)
    with open_model(artifacts["onnx"], threads=1) as a, open_model(artifacts["int8"], threads=1) as b:
        diff = np.abs(a(x) - b(x)).max()
    assert 0 < diff < 0.2


def test_cli_table_json_and_errors(artifacts):
    out = artifacts["dir"] / "cli.json"
    args = ["bench", str(artifacts["onnx"]), "--sizes", "16x16", "--runs", "2", "--warmup", "0", "--threads", "1",
            "--json", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "nano_fp32.onnx" in r.output and "no PyTorch checkpoint given" in r.output
    assert json.loads(out.read_text())["results"][0]["speedup_vs_eager"] is None
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(main, ["bench", str(artifacts["onnx"]), "--baseline", str(artifacts["onnx"])])
    assert r.exit_code == 1 and "must be a PyTorch checkpoint" in r.output
    r = CliRunner().invoke(main, ["bench", str(artifacts["dir"] / "missing.onnx")])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_ablation_script(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_magic_vs_pixelshuffle.py"
    spec = importlib.util.spec_from_file_location("ablation", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ablation.json"
    assert mod.main(["--sizes", "16x24", "--runs", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    heads = res["heads"]
    assert heads["mks2021"]["params_fused"] == heads["legacy"]["params_fused"] < heads["pixelshuffle"]["params_fused"]
    for ups in ("mks2021", "legacy"):  # SPEC §3: plain Pad/Conv/ConvTranspose, no Resize, no PixelShuffle
        assert "ConvTranspose" in heads[ups]["onnx_ops"]
        assert not {"Resize", "DepthToSpace", "Upsample"} & set(heads[ups]["onnx_ops"])
    assert "DepthToSpace" in heads["pixelshuffle"]["onnx_ops"] or "Transpose" in heads["pixelshuffle"]["onnx_ops"]
    for h in heads.values():  # overlap is what removes seams, whatever the head
        assert h["seams_overlap_16"]["max_abs_at_borders"] < 1e-2 < h["seams_no_overlap"]["max_abs_at_borders"]
    assert len(res["speed"]["results"]) == 6 and res["quality"] is None
    assert "Quality: not measured" in capsys.readouterr().out
