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

# The report file's keys, in their order: readers of bench.json depend on them.
REPORT_KEYS = ["format", "version", "created", "host", "settings", "latency", "memory", "limit", "peak", "baseline",
               "ratios", "results", "skipped"]
RESULT_KEYS = ["artifact", "name", "label", "runtime", "form", "precision", "scale", "size", "input_hw", "output_hw",
               "runs", "median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "throughput_img_s",
               "throughput_out_mpix_s", "peak_rss_mib", "memory_method", "baseline", "speedup_vs_eager",
               "macs_per_lr_pixel", "gmac_s", "peak_fraction"]


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
    written = json.loads(out.read_text())
    assert written == report.to_json() and list(written) == REPORT_KEYS
    assert all(list(r) == RESULT_KEYS for r in written["results"]) and written["skipped"] == []
    assert list(written["settings"]) == ["threads", "runs", "warmup", "sizes", "input"]
    assert list(written["peak"]) == ["fp32_gmac_s", "threads", "isa", "method"]
    assert written["format"] == "paragon-export/bench" and written["version"] == 1
    assert written["settings"]["threads"] == 1 and written["settings"]["sizes"] == ["24x40"]
    assert written["baseline"] == {"artifact": str(artifacts["unfused"]), "runtime": "torch eager fp32"}
    assert report.baseline == str(artifacts["unfused"])  # the unfused checkpoint, wherever listed
    rows = {r["name"]: r for r in written["results"]}
    assert list(rows) == ["nano_fp32.onnx", "nano.safetensors", "nano_int8.onnx"]
    for r in rows.values():
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
    # the limit: MACs per LR pixel from the graph (checkpoint: its conv calls), GMAC/s, fraction of the probed peak
    peak = report.peak.fp32_gmac_s
    assert peak > 0 and report.peak.isa
    for r in rows.values():
        assert r["label"] == r["name"]  # names are distinct here
        assert r["gmac_s"] == pytest.approx(r["macs_per_lr_pixel"] * 24 * 40 / r["median_ms"] / 1e6, rel=1e-3)
        assert r["peak_fraction"] == pytest.approx(r["gmac_s"] / peak, rel=1e-2)
    # int8 (ConvInteger) and fp32 graphs have the same convs; the unfused checkpoint's static path is the
    # same network (its identity channels are not convolved, so slightly fewer MACs)
    assert rows["nano_int8.onnx"]["macs_per_lr_pixel"] == rows["nano_fp32.onnx"]["macs_per_lr_pixel"]
    assert 0.8 < rows["nano.safetensors"]["macs_per_lr_pixel"] / rows["nano_fp32.onnx"]["macs_per_lr_pixel"] <= 1
    assert rows["nano_fp32.onnx"]["runtime"] == "onnxruntime"
    # The int8 artifact really runs: its output is close to, but not equal to, fp32's.
    from paragon_export.upscale import open_model

    x = np.random.default_rng(0).random((1, 3, 24, 40), dtype=np.float32)
    with open_model(artifacts["onnx"], threads=1) as a, open_model(artifacts["int8"], threads=1) as b:
        diff = np.abs(a(x) - b(x)).max()
    assert 0 < diff < 0.2


def test_same_file_names_get_distinct_labels(artifacts, tmp_path):
    import shutil

    other = tmp_path / "qat" / "nano_fp32.onnx"
    other.parent.mkdir()
    shutil.copy(artifacts["onnx"], other)
    report = bench([artifacts["onnx"], other], sizes=[(16, 16)], threads=1, runs=1, warmup=0)
    labels = [r.label for r in report.results]
    assert len(set(labels)) == 2 and labels[1] == "qat/nano_fp32.onnx"
    assert all(lb.endswith("nano_fp32.onnx") for lb in labels)
    table = report.markdown().splitlines()
    assert table[0].startswith("| artifact ") and "% peak" in table[0] and "kMAC/px" in table[0]
    assert table[3].startswith("| qat/nano_fp32.onnx ") and table[3].count("|") == 14
    assert table[-2].startswith("threads 1, 1 timed runs after 0 warm-up, no PyTorch checkpoint given")


def test_graph_mac_counter_on_a_known_graph():
    from onnx import TensorProto, helper, numpy_helper

    from paragon_export.onnx_graph import graph_macs, macs_per_pixel

    w1 = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w1")  # 3 -> 4, 3x3
    w2 = numpy_helper.from_array(np.ones((4, 1, 4, 4), np.float32), "w2")  # depthwise ConvTranspose x2
    nodes = [helper.make_node("Conv", ["input", "w1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["a", "w2"], ["b"], name="up", group=4, strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["b"], ["output"], name="d2s", blocksize=2)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], [w1, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    # Conv: 4 outputs x 8x8 x (3*3*3); ConvTranspose: 4 inputs x 8x8 x (1*4*4); DepthToSpace moves data only
    assert graph_macs(model, (8, 8)) == {"conv": 4 * 64 * 27, "up": 4 * 64 * 16}
    assert macs_per_pixel(model, (8, 8)) == 4 * 27 + 4 * 16


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
    from conftest import benchmark_module

    mod = benchmark_module("ablation_magic_vs_pixelshuffle")
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
