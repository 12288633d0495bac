"""The int8 report's comparison rows, on the same fp32 model and calibration crops as our recipe:
the original deploy script's recipe (what users had), and NVIDIA ModelOpt's own ONNX PTQ with its
defaults (what a TensorRT user reaches for first; `int8_peer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from paragon_export.calibration import CalibrationSet
from paragon_export.calibration.ranges import calibration_ranges

from .int8_check import brief, inspect_qdq, quiet_quantizer, trt_blockers
from .int8_eval import Evaluator
from .int8_remainder import dtype_mac_shares

PEER_RECIPE = ("QUInt8 asymmetric activations, QInt8 per-tensor weights, all op types, "
               "quantize_static(calibrate_method=Entropy), no exclusions")


def quantize_original(fp32: Path, out: Path, calib: CalibrationSet, cache_dir: Path | str | None) -> None:
    """The original deploy script's recipe on the same calibration crops. Its ranges come from the
    calibrator `quantize_static` itself builds for Entropy (ORT defaults), collected batch by batch:
    handed the whole reader at once, ORT holds every activation of every batch in memory."""
    ranges = calibration_ranges(fp32, calib, "ort-entropy", cache_dir=cache_dir)
    with quiet_quantizer():
        quantize_static(str(fp32), str(out), None, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=ranges.ort_method,
                        calibration_cache_path=str(ranges.cache_path))


def _row(path: Path, ev: Evaluator, shares: dict, **extra) -> dict:
    model = onnx.load(str(path))
    checks = inspect_qdq(model)
    blockers = trt_blockers(checks)
    return {**extra, "trt_compatible": not blockers, "trt_blockers": blockers, "quality": ev.quality(path),
            "checks": brief(checks), "mac_share": dtype_mac_shares(model, shares)}


def comparisons(fp32: Path, calib: CalibrationSet, tmp: Path, ev: Evaluator, shares: dict,
                cache_dir: Path | str | None, progress: Callable[[str], None]) -> tuple[dict, dict]:
    """({"peer": original recipe row, "modelopt": ModelOpt row or {"skipped": why}}, {row: model path})."""
    from .int8_peer import PeerUnavailable, modelopt_peer

    progress("running the original deploy recipe for comparison")
    quantize_original(fp32, tmp / "peer.onnx", calib, cache_dir)
    rows = {"peer": _row(tmp / "peer.onnx", ev, shares, recipe=PEER_RECIPE, remainder="fp32")}
    models = {"peer": tmp / "peer.onnx"}
    progress("running NVIDIA ModelOpt's ONNX PTQ (its defaults) for comparison")
    try:
        mo = modelopt_peer(fp32, calib, tmp / "modelopt" / "modelopt.onnx")
    except PeerUnavailable as e:
        rows["modelopt"] = {"skipped": str(e)}
        return rows, models
    rows["modelopt"] = _row(Path(mo["model"]), ev, shares, recipe=mo["recipe"], remainder=mo["remainder"],
                            excluded_nodes=mo["excluded_nodes"])
    models["modelopt"] = Path(mo["model"])
    return rows, models
