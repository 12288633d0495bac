"""Activation ranges for static INT8, collected with ONNX Runtime's calibrators and cached on disk.

The cache is ORT's own JSON calibration cache (`save_tensors_data`), so `quantize_static(...,
calibration_cache_path=...)` reads it directly. Its file name is derived from (model sha256,
calibration fingerprint, method, settings): a rerun on the same model and images skips collection.

Entropy is the real KL search: `quantize_static(calibrate_method=Entropy)` builds its calibrator
with 128 histogram bins and 128 quantized bins, which leaves exactly one candidate window (the full
range), i.e. MinMax. Here the calibrator gets TensorRT's 2048 bins and the search runs over them."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import TensorData, TensorsData, load_tensors_data, save_tensors_data

from paragon_export.artifact import sha256_file
from paragon_export.errors import ParagonError

from .entropy import entropy_threshold
from .set import CalibrationSet

METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy,
           # what quantize_static(calibrate_method=Entropy) does (the original deploy script's recipe)
           "ort-entropy": CalibrationMethod.Entropy}
USER_METHODS = ("minmax", "percentile", "entropy")
CALIBRATOR_OPTIONS = {
    "minmax": {},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "ort-entropy": {},
}
# Batches per collection pass. Histogram calibrators get every calibrated tensor of every batch in a
# pass back from ORT at once (full feature maps: about 1.5 GB per 4x64x64 batch for the s variant),
# so one batch per pass; the histograms and min/max merge across passes.
COLLECT_CHUNK = 1
CACHE_VERSION = 1


@dataclass
class Ranges:
    cache_path: Path
    method: str
    hit: bool  # True: read from the cache, no calibration inference ran
    batches: int  # batches run through the model to collect them (0 on a hit)
    seconds: float
    tensors: int

    @property
    def ort_method(self) -> CalibrationMethod:
        return METHODS[self.method]

    def summary(self) -> dict:
        return {"method": self.method, "cache": "hit" if self.hit else "miss", "cache_path": str(self.cache_path),
                "batches_collected": self.batches, "seconds": round(self.seconds, 3), "tensors": self.tensors}


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("PARAGON_EXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "paragon-export")
    return Path(base) / "calibration"


def cache_key(model_sha256: str, fingerprint: str, method: str, op_types: list[str] | None,
              inputs_only: bool = False) -> str:
    key = {"model": model_sha256, "calibration": fingerprint, "method": method,
           "options": CALIBRATOR_OPTIONS[method], "op_types": sorted(op_types) if op_types else "all",
           "inputs_only": inputs_only, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def calibration_ranges(model_path: Path | str, calib: CalibrationSet, method: str, *, cache_dir: Path | str | None = None,
                       op_types: list[str] | None = None, inputs_only: bool = False) -> Ranges:
    """Ranges of every tensor feeding or leaving an op of `op_types` (all ops if None), cached.

    `inputs_only`: keep only the tensors feeding those ops (all a recipe that leaves op outputs
    unquantized needs; it halves the entropy search)."""
    if method not in METHODS:
        raise ParagonError(f"unknown calibration method {method!r} (choose {', '.join(METHODS)})")
    model_path = Path(model_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(sha256_file(model_path), calib.fingerprint, method, op_types, inputs_only)
    path = cache_dir / f"{method}-{key[:40]}.json"
    t0 = time.perf_counter()
    if path.is_file():
        try:
            data = load_tensors_data(path)
            if data.calibration_method == METHODS[method] and len(data.data):
                return Ranges(path, method, True, 0, time.perf_counter() - t0, len(data.data))
        except (ValueError, KeyError, TypeError, OSError):
            pass  # unreadable or foreign cache file: recollect and overwrite it
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParagonError(f"cannot create calibration cache folder {cache_dir}: {e.strerror}") from None
    served = calib.served
    data = _collect(model_path, calib, method, op_types, inputs_only)
    save_tensors_data(data, path)  # ORT writes it atomically (temp file + rename)
    return Ranges(path, method, False, calib.served - served, time.perf_counter() - t0, len(data.data))


def _collect(model_path: Path, calib: CalibrationSet, method: str, op_types: list[str] | None,
             inputs_only: bool) -> TensorsData:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    calib.with_input_name(graph.input[0].name)
    wanted = None
    if inputs_only and op_types:
        wanted = {t for n in graph.node if n.op_type in op_types for t in n.input}
    with tempfile.TemporaryDirectory(prefix="paragon-calib-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=METHODS[method], extra_options=CALIBRATOR_OPTIONS[method],
                                       providers=["CPUExecutionProvider"])
        try:
            for start in range(0, len(calib), COLLECT_CHUNK):
                calib.set_range(start, start + COLLECT_CHUNK)
                calibrator.collect_data(calib)
        finally:
            calib.set_range(0, len(calib))
        if method == "entropy":  # the real KL search over the 2048-bin histograms
            hists = {k: v for k, v in calibrator.collector.histogram_dict.items() if wanted is None or k in wanted}
            ranges = {name: entropy_threshold(h[0], h[1], h[2], h[3], CALIBRATOR_OPTIONS[method]["num_quantized_bins"])
                      for name, h in hists.items()}
        else:
            ranges = {name: td.range_value for name, td in calibrator.compute_data().items()
                      if wanted is None or name in wanted}
    # Only the ranges go into the cache (not the histograms): that is all quantization reads.
    return TensorsData(METHODS[method], {
        name: TensorData(lowest=np.asarray(lo, np.float32).reshape(()), highest=np.asarray(hi, np.float32).reshape(()))
        for name, (lo, hi) in ranges.items()})
