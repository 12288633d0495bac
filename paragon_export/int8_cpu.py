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
import math
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
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
from .int8_eval import run, session
from .int8_recipe import Int8Recipe
from .metrics import psnr
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
    record: dict


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
                min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS) -> dict:
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
    return {"timer": "time.process_time", "threads": 1, "input": list(x.shape), "rounds": len(ratios),
            "fp32_ms": statistics.median(times["fp32"]) * 1e3, "int8_ms": statistics.median(times["int8"]) * 1e3,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios)}


def quality(fp32: Path | str, int8: Path | str, lrs: list[np.ndarray]) -> dict:
    """PSNR of the int8 output vs fp32 on the given LR images (HWC), through ORT's native kernels on
    this CPU and through the Q/DQ reference semantics: mean and worst image."""
    with session(fp32, 1) as ref:
        want = [np.clip(run(ref, lr), 0, 1) for lr in lrs]
    out = {"images": len(lrs)}
    for mode, native in (("native", True), ("reference", False)):
        with session(int8, 1, native_int8=native) as s:
            ps = [psnr(np.clip(run(s, lr), 0, 1), w) for lr, w in zip(lrs, want)]
        out[mode] = {"psnr_mean": _finite(float(np.mean(ps))), "psnr_min": _finite(float(min(ps)))}
    return out


def _finite(v: float) -> float | None:
    return None if math.isinf(v) else v  # None: identical outputs (JSON has no infinity)


def decide(record: dict, *, min_speedup: float = MIN_SPEEDUP, min_psnr: float = MIN_PSNR) -> tuple[bool, list[str]]:
    """Ship or not, from a record's measurements, with the reasons not to (empty when it ships).
    A figure not measured (None / absent) fails its test."""
    reasons = [r for r in (_slow(record, min_speedup), _inexact(record, min_psnr)) if r]
    return not reasons, reasons


def _slow(record: dict, min_speedup: float) -> str | None:
    speed = (record.get("speed") or {}).get("speedup")
    if speed is not None and speed >= min_speedup:
        return None
    return f"speed-up {'not measured' if speed is None else f'{speed:.2f}x'} < {min_speedup:g}x over ORT fp32"


def _inexact(record: dict, min_psnr: float) -> str | None:
    native = (record.get("quality") or {}).get("native") or {}
    if "psnr_min" not in native:
        return "native-kernel PSNR not measured"
    low = native["psnr_min"]  # None: identical to fp32
    if low is None or low >= min_psnr:
        return None
    return f"native-kernel PSNR vs fp32 {low:.2f} dB < {min_psnr:g} dB (worst held-out image)"


def describe(record: dict) -> str:
    """One line: the decision and the figures behind it."""
    sp, q = record.get("speed"), (record.get("quality") or {}).get("native")
    figs = []
    if sp:
        figs.append(f"{sp['speedup']:.2f}x fp32 [{sp['speedup_min']:.2f}..{sp['speedup_max']:.2f}] "
                    f"({sp['rounds']} rounds, {sp['input'][2]}x{sp['input'][3]}, 1 thread, CPU time)")
    if q:
        figs.append(f"PSNR vs fp32 {_db(q['psnr_min'])} worst / {_db(q['psnr_mean'])} mean (native kernels)")
    head = (f"CPU int8 ({record['isa']}, {record['recipe']['format']}, reduce_range "
            f"{'on' if record['recipe']['reduce_range'] else 'off'}): ")
    verdict = f"written {Path(record['output']['model']).name}" if record["shipped"] else "not written: " + "; ".join(record["reasons"])
    return head + verdict + (" -- " + ", ".join(figs) if figs else "")


def summary(record: dict) -> dict:
    """The record's decision and figures for a manifest: flat, without the calibration details."""
    sp, q = record.get("speed") or {}, (record.get("quality") or {}).get("native") or {}
    return {"shipped": record["shipped"], "reasons": record["reasons"], "isa": record["isa"],
            "runtime": record["runtime"], "format": record["recipe"]["format"],
            "reduce_range": record["recipe"]["reduce_range"], "thresholds": record["thresholds"],
            **{k: sp.get(k) for k in ("speedup", "speedup_min", "speedup_max", "rounds", "input")},
            "native_psnr_min": q.get("psnr_min"), "native_psnr_mean": q.get("psnr_mean"), "line": describe(record)}


def _db(v: float | None) -> str:
    return "identical" if v is None else f"{v:.2f} dB"


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
    limits = {"min_speedup": min_speedup, "min_psnr": min_psnr}
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
        record = _record(fp32_src, fp32, isa_name, limits)
        progress(f"timing an ORT CPU int8 model ({isa_name}) against fp32, 1 thread, {x.shape[2]}x{x.shape[3]}")
        record["speed"] = _probe(fp32, tmp, calib, x, record["recipe"]["reduce_range"], budget_s)
        int8 = tmp / "int8_cpu.onnx"
        if measure_all or _slow(record, min_speedup) is None:
            ranges = calibration_ranges(fp32, calib, METHOD, cache_dir=cache_dir)
            record["calibration"] = {**calib.summary(), **ranges.summary()}
            quantize_cpu(fp32, int8, reduce_range=record["recipe"]["reduce_range"], ranges=ranges)
            record["quality"] = quality(fp32, int8, [h.lr for h in calib.holdout])
        record["shipped"], record["reasons"] = decide(record, **limits)
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


def _record(fp32_src: Path, fp32: Path, isa_name: str, limits: dict) -> dict:
    import onnxruntime

    return {"isa": isa_name, "machine": platform.machine(), "runtime": f"onnxruntime {onnxruntime.__version__} CPU",
            "fp32_onnx": str(fp32_src), "fp32_sha256": sha256_file(fp32),
            "recipe": {"format": FORMAT, "activations": "uint8 asymmetric", "weights": "int8 symmetric, per-channel",
                       "reduce_range": reduce_range_for(isa_name), "ops": "every op ORT quantizes",
                       "calibration_method": METHOD},
            "thresholds": {**limits,
                           "psnr": "native kernels vs fp32, worst held-out image"},
            "speed": None, "quality": None}


def _probe(fp32: Path, tmp: Path, calib: CalibrationSet, x: np.ndarray, reduce_range: bool, budget_s: float) -> dict:
    """Time a model of the shipped structure, its ranges (MinMax) from one calibration batch only:
    scales do not change which kernels run, and the full calibration waits until the speed pays."""
    probe = tmp / "probe.onnx"
    calib.set_range(0, 1)
    try:
        quantize_cpu(fp32, probe, reduce_range=reduce_range, reader=calib)
    finally:
        calib.set_range(0, len(calib))
    return {**speed_probe(fp32, probe, x, budget_s=budget_s), "model": "same structure, ranges from 1 batch"}


def _write(record: dict, int8: Path, model_path: Path, report_path: Path, force: bool) -> CpuInt8:
    art = None
    record["output"] = {"model": str(model_path) if record["shipped"] else None, "report": str(report_path)}
    if record["shipped"]:
        proto = onnx.load(str(int8))
        set_metadata(proto, {"precision": "int8", "target": "onnxruntime-cpu", "isa": record["isa"],
                             "quantization": f"onnxruntime cpu {FORMAT}: uint8 activations, per-channel int8 weights"
                                             + (", reduce_range" if record["recipe"]["reduce_range"] else ""),
                             "fp32_sha256": record["fp32_sha256"],
                             "speedup_vs_fp32": f"{record['speed']['speedup']:.3f}",
                             "native_psnr_vs_fp32": f"{record['quality']['native']['psnr_min']}"})
        with atomic_output(model_path, force=force) as t:
            onnx.save(proto, str(t))
        record["output"]["sha256"] = sha256_file(model_path)
        record["ops"] = op_counts(proto)
        art = Artifact(model_path, "onnx-int8-cpu", record)
    with atomic_output(report_path, force=force) as t:
        t.write_text(json.dumps(record, indent=2))
    return CpuInt8(art, record)
