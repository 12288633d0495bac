"""The CPU int8 file: ONNX Runtime's own recipe, written only where the measured figures pay.
Real quantization of a seeded nano export, calibrated on real photos, run in real ORT sessions;
nothing here asserts a speed (that depends on the CPU and its load), only what is decided from one."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from conftest import export_onnx_file, make_model
from paragon_export.bench import bench_input
from paragon_export.calibration import build_calibration_set
from paragon_export.cli import main
from paragon_export.cpu import isa
from paragon_export.int8_cpu import (MIN_PSNR, MIN_SPEEDUP, cpu_int8, decide, label, output_paths, quantize_cpu,
                                     reduce_range_for)
from paragon_export.int8_cpu_report import CpuInt8Record, CpuQuality, PsnrFigures, Speed
from paragon_export.int8_eval import run, session
from paragon_export.metrics import psnr

SMALL = {"lr_size": (24, 24), "crops_per_image": 2, "batch_size": 1, "eval_size": (32, 32)}  # static batch 1
PROBE = (32, 32)  # the real probe is 256x256; the decision logic does not depend on the size


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A fused seeded nano, simplified as `paragon-export onnx` leaves it (static batch 1)."""
    import onnxsim

    path = export_onnx_file(make_model(fused=True), tmp_path_factory.mktemp("onnx") / "nano_x2_fp32.onnx")
    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    assert ok
    onnx.save(simplified, str(path))
    return path


@pytest.fixture(scope="module")
def calib():
    return build_calibration_set(None, scale=2, **SMALL)


@pytest.fixture(scope="module")
def shipped(fp32, calib, tmp_path_factory):
    """The step with the speed test made to pass whatever this CPU measures: the written file."""
    return cpu_int8(fp32, tmp_path_factory.mktemp("out"), calib=calib, cache_dir=tmp_path_factory.mktemp("cache"),
                    min_speedup=0.0, min_psnr=-math.inf, probe_lr=PROBE, budget_s=0.0)


def _measured(speedup, psnr_min):
    """decide()'s inputs: a speed probe with this speed-up, native-kernel figures with this worst PSNR
    (None: not measured / identical to fp32; False: quality not measured)."""
    speed = None if speedup is None else Speed("time.process_time", 1, [1, 3, 8, 8], 3, 1.0, 1.0, speedup, speedup,
                                              speedup)
    figs = PsnrFigures(psnr_min, psnr_min)
    return speed, None if psnr_min is False else CpuQuality(1, figs, figs)


@pytest.mark.parametrize("speedup, psnr_min, why", [
    (1.33, 45.0, None), (MIN_SPEEDUP, MIN_PSNR, None), (1.5, None, None),  # None: identical to fp32
    (0.83, 45.0, "speed-up 0.83x"), (1.19, 45.0, "speed-up 1.19x"), (float("nan"), 45.0, "speed-up nan"),
    (None, 45.0, "speed-up not measured"), (1.5, 39.99, "PSNR vs fp32 39.99 dB"),
    (1.5, False, "PSNR not measured")])
def test_thresholds_applied_to_injected_measurements(speedup, psnr_min, why):
    ok, reasons = decide(*_measured(speedup, psnr_min))
    assert ok is (why is None)
    assert reasons == [] if why is None else (len(reasons) == 1 and why in reasons[0])


def test_thresholds_are_parameters():
    assert decide(*_measured(1.1, 35.0), min_speedup=1.0, min_psnr=30.0) == (True, [])
    ok, reasons = decide(*_measured(1.1, 35.0))
    assert not ok and len(reasons) == 2


@pytest.mark.parametrize("name, reduce", [("avx2", True), ("avx512", True), ("x86_64", True),
                                          ("avx512-vnni", False), ("avx-vnni", False), ("amx", False),
                                          ("aarch64", False), ("arm64", False)])
def test_reduce_range_only_where_u8s8_saturates(name, reduce):
    assert reduce_range_for(name) is reduce


def test_file_name_labels_target_and_isa(tmp_path):
    model, report = output_paths(tmp_path, "paragonsr2_nano_x2_fp32_op17", "avx512-vnni")
    assert model.name == "paragonsr2_nano_x2_int8_cpu_avx512vnni_op17.onnx"
    assert report.name == "paragonsr2_nano_x2_int8_cpu_avx512vnni_op17_report.json"
    assert label("avx2") == "int8_cpu_avx2"


def test_reduce_range_gives_7_bit_weights(fp32, calib, tmp_path):
    """The saturation guard: with reduce_range every int8 weight fits 7 bits, so a u8s8 pair sum
    (2 x 255 x 64) stays inside int16; without it the weights use the full int8 range."""
    extremes = {}
    for reduce in (True, False):
        out = tmp_path / f"r{reduce}.onnx"
        calib.set_range(0, 1)
        try:
            quantize_cpu(fp32, out, reduce_range=reduce, reader=calib.with_input_name("input"))
        finally:
            calib.set_range(0, len(calib))
        w = [numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer
             if i.data_type == onnx.TensorProto.INT8 and i.dims]
        extremes[reduce] = max(int(np.abs(a.astype(np.int32)).max()) for a in w)
    assert extremes[True] <= 64 < extremes[False]


def test_shipped_file_is_valid_qdq_on_conv_outputs_and_close_to_fp32(shipped, fp32):
    art, rec = shipped.artifact, shipped.record
    assert art is not None and rec.shipped and art.path.name == f"nano_x2_{label(isa())}.onnx"
    model = onnx.load(str(art.path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8" and meta["target"] == "onnxruntime-cpu" and meta["isa"] == isa()
    consumers = {t: n.op_type for n in model.graph.node for t in n.input}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(consumers.get(n.output[0]) == "QuantizeLinear" for n in convs)  # outputs quantized too
    acts = [numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.UINT8 and not i.dims]
    assert acts  # uint8 activation zero points: ORT's u8s8 form
    x = bench_input(48, 40)
    with session(fp32) as s:
        ref = np.clip(run(s, x), 0, 1)
    # Q/DQ reference semantics: the same on every CPU, so a fixed bound.
    with session(art.path) as s:
        assert psnr(np.clip(run(s, x), 0, 1), ref) > 30.0
    assert rec.quality.reference.psnr_min > 30.0


def test_onnxruntime_fuses_it_into_integer_kernels(shipped, tmp_path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(shipped.artifact.path), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops


def test_record_names_isa_figures_and_decision(shipped):
    rec = json.loads(open(shipped.record.output.report).read())
    # the file keeps its schema, and the typed record reads it back unchanged
    assert list(rec) == ["isa", "machine", "runtime", "fp32_onnx", "fp32_sha256", "recipe", "thresholds", "speed",
                         "quality", "calibration", "shipped", "reasons", "output", "ops"]
    assert list(rec["output"]) == ["model", "report", "sha256"] and list(rec["quality"]) == ["images", "native", "reference"]
    assert rec == json.loads(json.dumps(shipped.record.to_json())) == shipped.artifact.meta
    assert json.dumps(CpuInt8Record.from_json(rec).to_json()) == json.dumps(rec)
    assert rec["isa"] == isa() and rec["recipe"]["reduce_range"] is reduce_range_for(isa())
    sp = rec["speed"]
    assert sp["threads"] == 1 and sp["rounds"] >= 3 and sp["input"] == [1, 3, *PROBE]
    assert sp["speedup_min"] <= sp["speedup"] <= sp["speedup_max"] and sp["fp32_ms"] > 0 and sp["int8_ms"] > 0
    assert rec["calibration"]["method"] == "percentile" and rec["calibration"]["batches"] > 0
    assert rec["shipped"] and rec["output"]["sha256"]
    line = CpuInt8Record.from_json(rec).line()
    assert line == shipped.record.line() and "written" in line and rec["isa"] in line


def test_not_paying_writes_only_the_record(fp32, calib, tmp_path):
    res = cpu_int8(fp32, tmp_path, calib=calib, cache_dir=tmp_path / "cache", min_speedup=math.inf,
                   probe_lr=PROBE, budget_s=0.0)
    model, report = output_paths(tmp_path, "nano_x2_fp32", isa())
    assert res.artifact is None and not model.exists() and report.is_file()
    rec = json.loads(report.read_text())
    assert not rec["shipped"] and rec["reasons"][0].startswith("speed-up")
    assert rec["quality"] is None and not (tmp_path / "cache").exists()  # no full calibration for a file never written
    assert "calibration" not in rec and "ops" not in rec and rec["output"] == {"model": None, "report": str(report)}
    assert "not written" in CpuInt8Record.from_json(rec).line() and res.record.summary()["shipped"] is False


def test_cli_cpu_option_writes_the_record_and_one_line(fp32, tmp_path):
    out = tmp_path / "cli"
    args = ["int8", str(fp32), "-o", str(out), "--crop", "24x24", "--crops-per-image", "2", "--batch-size", "1",
            "--eval-size", "32x32", "--node-budget", "0", "--no-peer", "--cache-dir", str(tmp_path / "c"), "--cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("CPU int8"))
    assert isa() in line and "PSNR vs fp32" in line  # the CLI measures both figures
    report = output_paths(out, "nano_x2_fp32", isa())[1]
    rec = json.loads(report.read_text())
    assert rec["quality"]["native"]["psnr_mean"] is not None and rec["speed"]["input"] == [1, 3, 256, 256]
    assert (out / "nano_x2_int8.onnx").is_file()  # the TensorRT file stays as it is, beside it


def test_cpu_int8_benchmark_script_runs_and_reports(tmp_path, capsys):
    # the benchmark is outside the package; it broke once unnoticed when the evaluator's sessions changed
    from conftest import benchmark_module

    mod = benchmark_module("cpu_int8")
    out = tmp_path / "cpu.json"
    assert mod.main(["--variants", "paragonsr2_nano", "--size", "32x32", "--rounds", "1", "--fit-steps", "1",
                     "--configs", "qdq:rr:all", "--json", str(out)]) == 0
    (rows,) = json.loads(out.read_text())["models"].values()
    assert rows["fp32"]["speed"]["speedup"] == 1.0 and rows["qdq:rr:all"]["speed"]["median_ms"] > 0
    q = rows["qdq:rr:all"]
    assert q["ops"].get("QuantizeLinear", 0) > 0 and 25 < q["quality"]["reference"]["psnr_min"] < 80
    assert "| qdq:rr:all |" in capsys.readouterr().out
