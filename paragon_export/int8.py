"""int8: FP32 ONNX + calibration images -> TensorRT-compatible Q/DQ INT8 ONNX, proven on held-out photos.

Recipe (what TensorRT explicit quantization needs, SPEC §5): ONNX Runtime `quantize_static` in QDQ
format, int8 symmetric activations and weights (zero point 0), per-channel weights on the
output-channel axis, float biases, Q/DQ on the inputs of Conv/ConvTranspose only (TensorRT fuses
the rest; residual adds and the output stay in float). Ranges come from `calibration.ranges`
(cached; entropy is the real KL search). Biases are corrected for the int8 weights' mean error
(`int8_bias`).

Convs TensorRT has no int8 kernel for (ModelOpt's small-channel rules, `int8_check.trt_int8_exclusions`)
are never quantized. The rest of the float part runs fp16 by default (`int8_remainder`). While the
model misses the accuracy target, `int8_search.mixed_precision` keeps the costliest nodes in float.

The original deploy script's recipe (asymmetric QUInt8 activations, per-tensor weights, entropy
through `quantize_static`, no exclusions) runs on the same model and data for comparison (`int8_compare`)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from paragon_export.calibration import CalibrationSet
from paragon_export.calibration.ranges import Ranges, calibration_ranges

from .artifact import atomic_output, check_output, sha256_file
from .errors import ParagonError
from .int8_cache import load_search, search_cache_base, store_search
from .int8_check import brief, inspect_qdq, mac_shares, trt_blockers
from .int8_compare import comparisons
from .int8_eval import RANK_CROPS, Evaluator, Latency, latency, native_vs_reference
from .int8_input import from_checkpoint, infer_scale, load_fp32, prepare, recipe_calibration_set, static_dims
from .int8_recipe import Int8Recipe
from .int8_report import Checks, Int8Report, MixedPrecision, ModelInfo, Output, PeerRow, Qualities
from .int8_remainder import FP16_QDQ_OPSET, Remainder, dtype_mac_shares, plan_remainder
from .int8_search import TRT_OPS, mixed_precision
from .onnx_graph import set_metadata

CALIB_PROBES = 8  # calibration batches the fp16 overflow guard measures activation peaks on


# ---------------------------------------------------------------- the step

def output_paths(out_dir: Path, stem: str, opset: int | None = None) -> tuple[Path, Path]:
    """`{variant}_x{s}_fp32_op{N}` -> `{variant}_x{s}_int8_op{N}.onnx` (+ `_report.json`), the export's
    naming, with the written file's opset when it differs; any other stem gets `_int8` appended."""
    base = stem.replace("_fp32", "_int8") if "_fp32" in stem else f"{stem}_int8"
    if opset is not None:
        base = re.sub(r"_op\d+$", f"_op{opset}", base)
    return out_dir / f"{base}.onnx", out_dir / f"{base}_report.json"


def quantize_int8(model: Path | str, out_dir: Path | str, recipe: Int8Recipe | None = None, *,
                  calib_dir: Path | str | None = None, calib: CalibrationSet | None = None,
                  cache_dir: Path | str | None = None, peer: bool = True, threads: int = 1,
                  variant: str | None = None, scale: int | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> Int8Report:
    """MODEL (.onnx FP32, or a checkpoint) -> `{out_dir}/<variant>_x<s>_int8_op<N>.onnx` + `..._report.json`,
    made as `recipe` says (default `Int8Recipe()`); `calib` replaces the set the recipe would build.

    Returns the report (also written as JSON); its `path` is the model."""
    progress = progress or (lambda _msg: None)
    r = (recipe or Int8Recipe()).check()
    src = Path(model)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="paragon-int8-") as tmp_name:
        tmp = Path(tmp_name)
        fp32_src = src if src.suffix.lower() == ".onnx" else from_checkpoint(src, tmp, variant, scale, progress)
        model_path, report_path = output_paths(out_dir, fp32_src.stem,
                                               FP16_QDQ_OPSET if r.remainder == "fp16" else None)
        check_output(model_path, force=force)
        check_output(report_path, force=force)
        fp32, batch, static_hw, found = _fp32_model(fp32_src, tmp, scale)
        calib = _calibration_set(calib, calib_dir, r, found, batch, static_hw, progress)

        progress(f"calibrating ({r.method}) on {len(calib.crops)} crops from {len(calib.calib_images)} images")
        ranges = calibration_ranges(fp32, calib, r.method, cache_dir=cache_dir, op_types=TRT_OPS, inputs_only=True)
        progress(f"calibration ranges: cache {'hit (no inference run)' if ranges.hit else 'miss'} ({ranges.cache_path})")
        ev = Evaluator(fp32, calib, found, threads, static_batch=batch is not None)
        prepared = onnx.load(str(fp32))
        rest = plan_remainder(r.remainder, prepared, [calib.batch(i) for i in range(min(len(calib), CALIB_PROBES))])
        found_mp, searched, int8_quality = _search(fp32, ranges, ev, rest, r, tmp, batch is not None, progress)
        int8_proto, mp = _shipped(found_mp, searched, rest, prepared, r, calib, fp32)
        int8_bytes = int8_proto.SerializeToString()
        checks = inspect_qdq(int8_proto)
        blockers = trt_blockers(checks)
        if blockers:
            raise ParagonError(f"the INT8 model is not TensorRT-compatible: {'; '.join(blockers)}")
        (tmp / "int8.onnx").write_bytes(int8_bytes)
        native = native_vs_reference(tmp / "int8.onnx", [h.lr for h in calib.holdout], threads)
        rows, lat = _peers_and_latency(fp32, tmp / "int8.onnx", calib, tmp, ev, mac_shares(prepared), cache_dir,
                                       peer, threads, progress)
        with atomic_output(model_path, force=force) as t:
            t.write_bytes(int8_bytes)
        report = Int8Report(
            model=ModelInfo(str(src), str(fp32_src), sha256_file(fp32), found),
            calibration={**calib.summary(), **ranges.summary()}, recipe=_recipe_summary(r),
            checks=Checks(**brief(checks)), mixed_precision=mp,
            quality=Qualities(ev.fp32, int8_quality),
            latency=lat, native_kernels=native,
            peer=PeerRow.from_json(rows.get("peer")), modelopt=PeerRow.from_json(rows.get("modelopt")),
            output=Output(str(model_path), sha256_file(model_path), str(report_path)))
        with atomic_output(report_path, force=force) as t:
            t.write_text(json.dumps(report.to_json(), indent=2, default=_json_default))
    return report


def _fp32_model(fp32_src: Path, tmp: Path, scale: int | None) -> tuple[Path, int | None, tuple[int, int] | None, int]:
    """The checked, prepared FP32 model: (its path, static batch, static LR size, upscale factor)."""
    proto = load_fp32(fp32_src)
    fp32 = prepare(proto, tmp, fp32_src)
    batch, static_hw = static_dims(proto)
    found = infer_scale(fp32, static_hw)
    if scale is not None and scale != found:
        raise ParagonError(f"--scale {scale} does not match the model (x{found})")
    return fp32, batch, static_hw, found


def _calibration_set(calib: CalibrationSet | None, calib_dir, r: Int8Recipe, scale: int, batch: int | None,
                     static_hw: tuple[int, int] | None, progress: Callable[[str], None]) -> CalibrationSet:
    """The recipe's calibration set (a static input shape fixes crops and batch), or the one given."""
    calib = recipe_calibration_set(calib, calib_dir, r, scale, batch, static_hw)
    if r.max_drop is not None and not all(h.hr is not None for h in calib.holdout):
        raise ParagonError("held-out images have no HR ground truth: use --target-psnr instead of --max-drop")
    for s in calib.skipped:
        progress(f"warning: skipped {s}")
    return calib


def _search(fp32: Path, ranges: Ranges, ev: Evaluator, rest: Remainder, r: Int8Recipe, tmp: Path,
            static_batch: bool, progress: Callable[[str], None]) -> tuple[dict, bytes, dict]:
    """The mixed-precision search's outcome (its report fields), model and held-out quality, replayed
    from its cache (one held-out measurement) or run."""
    search = r.search_options()
    base = search_cache_base(ranges.cache_path, {**search, "remainder": rest.summary(), "rank_crops": RANK_CROPS,
                                                 "static_batch": static_batch})
    mp = load_search(base)
    if mp is not None:
        progress(f"mixed-precision search: cache hit ({base}.json); measuring the cached model")
        model = mp.pop("model")
        return {**mp, "search_cache": "hit"}, model, ev.quality(rest.apply(onnx.load_from_string(model)).SerializeToString())
    mp = mixed_precision(fp32, ranges, ev, tmp, **search, remainder=rest, progress=progress)
    store_search(base, mp)
    model, quality = mp.pop("model"), mp.pop("quality")
    return {**mp, "search_cache": "miss"}, model, quality


def _shipped(found: dict, searched: bytes, rest: Remainder, prepared: onnx.ModelProto, r: Int8Recipe,
             calib: CalibrationSet, fp32: Path) -> tuple[onnx.ModelProto, MixedPrecision]:
    """The searched model with its float remainder and metadata, and the search's report part with
    the MAC shares and remainder of that model."""
    int8_proto = rest.apply(onnx.load_from_string(searched))
    mp = MixedPrecision.from_json({**found, "mac_share": dtype_mac_shares(int8_proto, mac_shares(prepared)),
                                   "remainder": rest.summary()})
    # Downstream steps (engine, parity) read the precision from metadata and cross-check the graph.
    set_metadata(int8_proto, {"precision": "int8", "quantization": "qdq int8 symmetric, per-channel weights",
                              "remainder": r.remainder, "calibration_method": r.method,
                              "calibration_fingerprint": calib.fingerprint,
                              "float_nodes": ",".join(mp.float_fixed + mp.kept_float),
                              "fp32_nodes": ",".join(sorted(rest.kept_fp32)),
                              "int8_mac_share": f"{mp.mac_share['int8']:.4f}",
                              "fp32_sha256": sha256_file(fp32)})
    return int8_proto, mp


def _peers_and_latency(fp32: Path, int8: Path, calib: CalibrationSet, tmp: Path, ev: Evaluator, shares: dict,
                       cache_dir, peer: bool, threads: int, progress: Callable[[str], None]) -> tuple[dict, Latency]:
    """The comparison rows (original recipe, ModelOpt) unless `peer` is off, and ORT CPU latency of every model."""
    models = {"fp32": fp32, "int8": int8}
    rows: dict = {}
    if peer:
        rows, more = comparisons(fp32, calib, tmp, ev, shares, cache_dir, progress)
        models.update(more)
    progress("timing on ONNX Runtime CPU")
    return rows, latency(models, calib.holdout[0].lr, threads=threads)


def _recipe_summary(r: Int8Recipe) -> dict:
    return {"format": "QDQ", "activations": "int8 symmetric (zero point 0)",
            "weights": "int8 symmetric, per-channel (Conv axis 0, ConvTranspose axis 1)",
            "bias": "float" + (", corrected for the int8 weights' mean error" if r.bias_correction else ""),
            "quantized_ops": TRT_OPS, "output_quantization": False,
            "method": r.method, "trt_compatible": True, "options": r.as_dict()}


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
