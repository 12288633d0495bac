"""int8 for ONNX Runtime's own CPU kernels: a separate, labelled file, written only where it pays.

The TensorRT file (`int8`) has Q/DQ on conv inputs only; ORT CPU cannot fuse that and runs it as
float convs between quantize/dequantize pairs. ORT fuses DQ -> op -> Q into its integer kernels
(QLinearConv, QLinearAdd, ...) when the op's output is quantized too, in the u8s8 form: uint8
activations, int8 weights. So this recipe is ORT's own: `quantize_static` on every op ORT has a
quantized form of, per-channel weights. x86 without VNNI (AVX2, AVX-512 F/BW, SSE) multiplies u8s8
with vpmaddubsw, whose int16 sum of two products saturates: `reduce_range` (7-bit weights) keeps it
exact there and is off where VNNI/AMX or another ISA computes exactly.

Whether that pays depends on the model, the input size and the CPU, so the file is written only
when, on this CPU, it is at least MIN_SPEEDUP x faster than the fp32 ONNX on ORT (CPU-time ratio, one
thread, a 256x256 LR photo crop, round-robin, median of the rounds) and its output through ORT's
native kernels is at least MIN_PSNR dB from fp32 on every held-out photo. The speed needs no
calibration (the kernels run the same whatever the scales), so it is probed first on a model
quantized with ranges from one calibration batch, and the full calibration runs only if the speed
pays. Either way the step returns a record of what it measured, with the ISA, and the decision;
the file's name carries `int8_cpu_<isa>`.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from paragon_export.calibration import CalibrationSet
from paragon_export.calibration.ranges import calibration_ranges

from .artifact import Artifact, atomic_output, check_output, sha256_file
from .cpu import isa
from .int8_check import quiet_quantizer
from .int8_cpu_report import CpuInt8Record, CpuOutput, CpuQuality, CpuRecipe, PsnrFigures, Speed, Thresholds
from .int8_eval import run, session
from .int8_recipe import Int8Recipe
from .metrics import json_finite, psnr
from .onnx_graph import op_counts, set_metadata

MIN_SPEEDUP = 1.2  # CPU time of fp32 / CPU time of int8 on ORT, one thread
MIN_PSNR = 40.0  # native-kernel output vs fp32, worst held-out photo (dB)
PROBE_LR = (256, 256)
PROBE_BUDGET_S = 4.0  # CPU seconds of timed runs after warm-up, once MIN_ROUNDS rounds are done
MIN_ROUNDS, MAX_ROUNDS = 3, 15
FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
FORMAT = "qdq"  # measured against qoperator (README); Q/DQ also keeps reference semantics to verify with
METHOD = "percentile"  # activation ranges of the shipped file (the probe model's do not matter)
_EXACT_U8S8 = ("amx", "avx512-vnni", "avx-vnni")


def reduce_range_for(isa_name: str) -> bool:
    """True where ORT's u8s8 kernels saturate: x86 without VNNI/AMX."""
    if isa_name in _EXACT_U8S8:
        return False
    return isa_name in ("avx512", "avx2") or isa_name in ("x86_64", "amd64", "i386", "i686")


def label(isa_name: str) -> str:
    return f"int8_cpu_{isa_name.replace('-', '')}"


def output_paths(out_dir: Path, stem: str, isa_name: str) -> tuple[Path, Path]:
    """`{variant}_x{s}_fp32_op{N}` -> `{variant}_x{s}_int8_cpu_{isa}_op{N}.onnx` (+ `_report.json`)."""
    tag = label(isa_name)
    base = stem.replace("_fp32", f"_{tag}") if "_fp32" in stem else f"{stem}_{tag}"
    return out_dir / f"{base}.onnx", out_dir / f"{base}_report.json"


@dataclass(frozen=True)
class CpuInt8:
    """The step's outcome: `artifact` when the file was written, always the `record` of figures."""

    artifact: Artifact | None
    record: CpuInt8Record


# ---------------------------------------------------------------- quantize and measure

def quantize_cpu(fp32: Path, out: Path, *, reduce_range: bool, fmt: str = FORMAT, ranges=None,
                 reader: CalibrationSet | None = None) -> None:
    """ORT's CPU recipe: u8 activations, per-channel s8 weights, every op ORT quantizes, Q/DQ on
    outputs too. Ranges from the calibration cache (`ranges`) or collected from `reader` (MinMax)."""
    kw = ({"calibrate_method": ranges.ort_method, "calibration_cache_path": str(ranges.cache_path)}
          if ranges is not None else {"calibrate_method": CalibrationMethod.MinMax})
    with quiet_quantizer():
        quantize_static(str(fp32), str(out), reader, quant_format=FORMATS[fmt], per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        **kw)


def speed_probe(fp32: Path | str, int8: Path | str, x: np.ndarray, *, budget_s: float = PROBE_BUDGET_S,
                min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS) -> Speed:
    """fp32 vs native int8 on ORT CPU, one thread: CPU time (the machine may be shared), one run of
    each per round in alternating order, the speed-up per round and its median and spread."""
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    spent = 0.0
    with session(fp32, 1) as s32, session(int8, 1, native_int8=True) as s8:
        sessions = {"fp32": s32, "int8": s8}
        for s in sessions.values():
            run(s, x)  # warm-up: allocations and ORT's first-run kernel choices
        for r in range(max_rounds):
            for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                t = time.process_time()
                run(sessions[k], x)
                dt = time.process_time() - t
                times[k].append(dt)
                spent += dt
            if r + 1 >= min_rounds and spent >= budget_s:
                break
    ratios = [f / i for f, i in zip(times["fp32"], times["int8"])]
    return Speed(timer="time.process_time", threads=1, input=list(x.shape), rounds=len(ratios),
                 fp32_ms=statistics.median(times["fp32"]) * 1e3, int8_ms=statistics.median(times["int8"]) * 1e3,
                 speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios))


def quality(fp32: Path | str, int8: Path | str, lrs: list[np.ndarray]) -> CpuQuality:
    """PSNR of the int8 output vs fp32 on the given LR images (HWC), through ORT's native kernels on
    this CPU and through the Q/DQ reference semantics: mean and worst image."""
    with session(fp32, 1) as ref:
        want = [np.clip(run(ref, lr), 0, 1) for lr in lrs]
    out = []
    for native in (True, False):
        with session(int8, 1, native_int8=native) as s:
            ps = [psnr(np.clip(run(s, lr), 0, 1), w) for lr, w in zip(lrs, want)]
        # None: identical outputs (JSON has no infinity)
        out.append(PsnrFigures(psnr_mean=json_finite(float(np.mean(ps))), psnr_min=json_finite(float(min(ps)))))
    return CpuQuality(len(lrs), *out)


def decide(speed: Speed | None, quality: CpuQuality | None, *, min_speedup: float = MIN_SPEEDUP,
           min_psnr: float = MIN_PSNR) -> tuple[bool, list[str]]:
    """Ship or not, from the measurements, with the reasons not to (empty when it ships).
    A figure not measured (None) fails its test."""
    reasons = [r for r in (_slow(speed, min_speedup), _inexact(quality, min_psnr)) if r]
    return not reasons, reasons


def _slow(speed: Speed | None, min_speedup: float) -> str | None:
    sp = speed.speedup if speed is not None else None
    if sp is not None and sp >= min_speedup:
        return None
    return f"speed-up {'not measured' if sp is None else f'{sp:.2f}x'} < {min_speedup:g}x over ORT fp32"


def _inexact(quality: CpuQuality | None, min_psnr: float) -> str | None:
    if quality is None:
        return "native-kernel PSNR not measured"
    low = quality.native.psnr_min  # None: identical to fp32
    if low is None or low >= min_psnr:
        return None
    return f"native-kernel PSNR vs fp32 {low:.2f} dB < {min_psnr:g} dB (worst held-out image)"


# ---------------------------------------------------------------- the step

def cpu_int8(model: Path | str, out_dir: Path | str, recipe: Int8Recipe | None = None, *,
             calib_dir: Path | str | None = None, calib: CalibrationSet | None = None,
             cache_dir: Path | str | None = None, measure_all: bool = False, force: bool = False,
             min_speedup: float = MIN_SPEEDUP, min_psnr: float = MIN_PSNR, probe_lr: tuple[int, int] = PROBE_LR,
             budget_s: float = PROBE_BUDGET_S, variant: str | None = None, scale: int | None = None,
             progress: Callable[[str], None] | None = None) -> CpuInt8:
    """FP32 MODEL (.onnx, or a checkpoint) -> `{out_dir}/..._int8_cpu_<isa>_op<N>.onnx` when it pays on
    this CPU, and always `..._report.json` with the record. The calibration set is the one `int8`
    builds from `recipe` (or `calib`). `measure_all`: measure the quality even when the speed fails."""
    from .int8_input import from_checkpoint, load_fp32, prepare

    progress = progress or (lambda _msg: None)
    r = (recipe or Int8Recipe()).check()
    isa_name = isa()
    src, out_dir = Path(model), Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="paragon-int8-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        fp32_src = src if src.suffix.lower() == ".onnx" else from_checkpoint(src, tmp, variant, scale, progress)
        model_path, report_path = output_paths(out_dir, fp32_src.stem, isa_name)
        check_output(model_path, force=force)
        check_output(report_path, force=force)
        proto = load_fp32(fp32_src)
        fp32 = prepare(proto, tmp, fp32_src)
        calib, x = _inputs(fp32, proto, r, calib_dir, calib, probe_lr)
        record = _record(fp32_src, fp32, isa_name, Thresholds(min_speedup, min_psnr))
        reduce = record.recipe.reduce_range
        progress(f"timing an ORT CPU int8 model ({isa_name}) against fp32, 1 thread, {x.shape[2]}x{x.shape[3]}")
        speed = _probe(fp32, tmp, calib, x, reduce, budget_s)
        int8 = tmp / "int8_cpu.onnx"
        calibration = measured = None
        if measure_all or _slow(speed, min_speedup) is None:
            ranges = calibration_ranges(fp32, calib, METHOD, cache_dir=cache_dir)
            calibration = {**calib.summary(), **ranges.summary()}
            quantize_cpu(fp32, int8, reduce_range=reduce, ranges=ranges)
            measured = quality(fp32, int8, [h.lr for h in calib.holdout])
        shipped, reasons = decide(speed, measured, min_speedup=min_speedup, min_psnr=min_psnr)
        record = replace(record, speed=speed, quality=measured, calibration=calibration, shipped=shipped,
                         reasons=reasons)
        return _write(record, int8, model_path, report_path, force)


def _inputs(fp32: Path, proto: onnx.ModelProto, r: Int8Recipe, calib_dir, calib: CalibrationSet | None,
            probe_lr: tuple[int, int]):
    """The calibration set `int8` would build, and the probe input (a real photo crop)."""
    from .bench import bench_input
    from .int8_input import infer_scale, recipe_calibration_set, static_dims

    batch, static_hw = static_dims(proto)
    found = infer_scale(fp32, static_hw)
    calib = recipe_calibration_set(calib, calib_dir, r, found, batch, static_hw)
    x = bench_input(*(static_hw or probe_lr)).astype(np.float32)
    return calib.with_input_name(proto.graph.input[0].name), np.repeat(x, batch or 1, axis=0)


def _record(fp32_src: Path, fp32: Path, isa_name: str, limits: Thresholds) -> CpuInt8Record:
    import onnxruntime

    return CpuInt8Record(isa=isa_name, machine=platform.machine(), runtime=f"onnxruntime {onnxruntime.__version__} CPU",
                         fp32_onnx=str(fp32_src), fp32_sha256=sha256_file(fp32),
                         recipe=CpuRecipe(format=FORMAT, activations="uint8 asymmetric",
                                          weights="int8 symmetric, per-channel", reduce_range=reduce_range_for(isa_name),
                                          ops="every op ORT quantizes", calibration_method=METHOD),
                         thresholds=limits)


def _probe(fp32: Path, tmp: Path, calib: CalibrationSet, x: np.ndarray, reduce_range: bool, budget_s: float) -> Speed:
    """Time a model of the shipped structure, its ranges (MinMax) from one calibration batch only:
    scales do not change which kernels run, and the full calibration waits until the speed pays."""
    probe = tmp / "probe.onnx"
    calib.set_range(0, 1)
    try:
        quantize_cpu(fp32, probe, reduce_range=reduce_range, reader=calib)
    finally:
        calib.set_range(0, len(calib))
    return replace(speed_probe(fp32, probe, x, budget_s=budget_s), model="same structure, ranges from 1 batch")


def _write(record: CpuInt8Record, int8: Path, model_path: Path, report_path: Path, force: bool) -> CpuInt8:
    sha = ops = None
    if record.shipped:
        proto = onnx.load(str(int8))
        set_metadata(proto, {"precision": "int8", "target": "onnxruntime-cpu", "isa": record.isa,
                             "quantization": f"onnxruntime cpu {FORMAT}: uint8 activations, per-channel int8 weights"
                                             + (", reduce_range" if record.recipe.reduce_range else ""),
                             "fp32_sha256": record.fp32_sha256,
                             "speedup_vs_fp32": f"{record.speed.speedup:.3f}",
                             "native_psnr_vs_fp32": f"{record.quality.native.psnr_min}"})
        with atomic_output(model_path, force=force) as t:
            onnx.save(proto, str(t))
        sha, ops = sha256_file(model_path), op_counts(proto)
    record = replace(record, output=CpuOutput(str(model_path) if record.shipped else None, str(report_path), sha),
                     ops=ops)
    with atomic_output(report_path, force=force) as t:
        t.write_text(json.dumps(record.to_json(), indent=2))
    return CpuInt8(Artifact(model_path, "onnx-int8-cpu", record.to_json()) if record.shipped else None, record)
