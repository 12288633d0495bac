"""Measure INT8 models against their FP32 source on ONNX Runtime CPU: quality on the held-out images
(SPEC §6: Y-PSNR/SSIM against ground truth, border = scale; PSNR against the fp32 output) and
latency as a ratio to fp32 measured in the same run."""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from paragon_export.calibration import CalibrationSet

from .cpu import isa
from .metrics import psnr, psnr_y, ssim_y
from .onnx_graph import onnx_runner
from .records import Record, optional

RANK_CROPS = 8  # calibration crops the node ranking is measured on (it runs once per candidate node)

_SCORES = ("psnr_vs_fp32", "y_psnr", "ssim")


@dataclass(frozen=True)
class Scores(Record):
    """Held-out means (SPEC section 6). None: not measured (no HR: no Y-PSNR/SSIM; fp32 has no drop)."""

    psnr_vs_fp32: float | None = optional()
    y_psnr: float | None = optional()
    ssim: float | None = optional()
    y_psnr_drop: float | None = optional()


@dataclass(frozen=True)
class ImageScore(Record):
    image: str
    lr: list[int]
    psnr_vs_fp32: float | None = optional()
    y_psnr: float | None = optional()
    ssim: float | None = optional()


@dataclass(frozen=True)
class Quality(Record):
    """One model on the held-out images (`int8_eval.Evaluator.quality`; the QAT report's torch models too)."""

    mean: Scores
    images: list[ImageScore]

    @classmethod
    def of(cls, images: list[ImageScore]) -> Quality:
        """Means over `images` of the figures the first one has."""
        mean = {k: float(np.mean([getattr(p, k) for p in images]))
                for k in _SCORES if images and getattr(images[0], k) is not None}
        return cls(Scores(**mean), images)

    def with_drop(self, fp32: Quality) -> Quality:
        """With its Y-PSNR drop against `fp32` (positive = worse), when both have Y-PSNR."""
        if self.mean.y_psnr is None or fp32.mean.y_psnr is None:
            return self
        return replace(self, mean=replace(self.mean, y_psnr_drop=fp32.mean.y_psnr - self.mean.y_psnr))


@contextlib.contextmanager
def session(model: Path | str | bytes, threads: int = 1, *, native_int8: bool = False):
    """An active ORT CPU runner (`runners.onnx_runner`: Q/DQ reference semantics unless `native_int8`);
    a model ORT cannot load is one ParagonError line."""
    with onnx_runner(model, name="int8-eval", threads=threads, native_int8=native_int8) as runner:
        runner.input_name = next(iter(runner.get_input_metadata(use_numpy_dtypes=False)))
        yield runner


def run(runner, x: np.ndarray) -> np.ndarray:
    """NCHW batch (or one HWC image) in, float32 NCHW out, on a runner from `session`."""
    if x.ndim == 3:
        x = x.transpose(2, 0, 1)[None]
    # ORT checks the feed itself (Polygraphy's check would log its own error lines first).
    return next(iter(runner.infer({runner.input_name: np.ascontiguousarray(x, np.float32)}, check_inputs=False).values()))


def _hwc(y: np.ndarray) -> np.ndarray:
    return y[0].transpose(1, 2, 0)


class Evaluator:
    """Holds the fp32 outputs (computed once) that every candidate INT8 model is compared with."""

    def __init__(self, fp32: Path | str, calib: CalibrationSet, scale: int, threads: int = 1,
                 static_batch: bool = False) -> None:
        self.calib, self.scale, self.threads = calib, scale, threads
        with session(fp32, threads) as sess:
            self.ref = [_hwc(run(sess, h.lr)) for h in calib.holdout]
            self.rank_ref = [run(sess, b) for b in self._rank_inputs(calib, static_batch)]
        self.has_gt = all(h.hr is not None for h in calib.holdout)
        self.fp32 = self._scores(self.ref)

    def _rank_inputs(self, calib: CalibrationSet, static_batch: bool) -> list[np.ndarray]:
        if static_batch:
            self.rank_inputs = [calib.batch(i) for i in range(min(len(calib), -(-RANK_CROPS // calib.batch_size)))]
        else:
            # Spread over the whole set: consecutive crops come from the same photo.
            pick = np.linspace(0, len(calib.crops) - 1, min(RANK_CROPS, len(calib.crops))).round().astype(int)
            crops = calib.crops[np.unique(pick)]
            self.rank_inputs = [crops[i:i + 8].copy() for i in range(0, len(crops), 8)]
        return self.rank_inputs

    def _scores(self, outs: list[np.ndarray]) -> Quality:
        per = []
        for h, y, ref in zip(self.calib.holdout, outs, self.ref):
            vs_fp32 = psnr(np.clip(y, 0, 1), np.clip(ref, 0, 1))
            gt = (None, None) if h.hr is None else (psnr_y(y, h.hr, self.scale), ssim_y(y, h.hr, self.scale))
            per.append(ImageScore(h.name, list(h.lr.shape[:2]), vs_fp32, *gt))
        return Quality.of(per)

    def quality(self, model: Path | str | bytes) -> Quality:
        """Held-out scores of `model`, plus its Y-PSNR drop against fp32 (positive = worse)."""
        with session(model, self.threads) as sess:
            return self._scores([_hwc(run(sess, h.lr)) for h in self.calib.holdout]).with_drop(self.fp32)

    def rank_score(self, model: Path | str | bytes) -> float:
        """PSNR against fp32 over a few calibration batches: ranks nodes without touching held-out data."""
        with session(model, self.threads) as sess:
            mse = [float(np.mean((np.clip(run(sess, x), 0, 1) - np.clip(r, 0, 1)) ** 2))
                   for x, r in zip(self.rank_inputs, self.rank_ref)]
        m = float(np.mean(mse))
        return float("inf") if m == 0 else 10.0 * np.log10(1.0 / m)


def native_vs_reference(model: Path | str | bytes, lrs: list[np.ndarray], threads: int = 1) -> NativeKernels:
    """What ONNX Runtime's native integer kernels on this CPU make of `model`: worst PSNR and max abs
    of their output against the Q/DQ reference semantics, on the given LR images, with the ISA."""
    import onnxruntime

    psnrs, worst = [], 0.0
    with session(model, threads) as ref, session(model, threads, native_int8=True) as nat:
        for lr in lrs:
            a, b = np.clip(run(ref, lr), 0, 1), np.clip(run(nat, lr), 0, 1)
            psnrs.append(psnr(b, a))
            worst = max(worst, float(np.abs(a - b).max()))
    low = min(psnrs)
    return NativeKernels(f"onnxruntime {onnxruntime.__version__} CPU", isa(),
                         None if low == float("inf") else low, worst, len(lrs))  # None: bit-identical


@dataclass(frozen=True)
class NativeKernels(Record):
    """What ONNX Runtime's native integer kernels on this CPU make of an int8 model, against its Q/DQ
    reference semantics: worst PSNR (None: bit-identical) and max abs over the held-out images."""

    runtime: str
    isa: str
    psnr_vs_reference: float | None
    max_abs_vs_reference: float
    images: int

    def line(self) -> str:
        p = self.psnr_vs_reference
        return (f"native int8 kernels ({self.runtime}, {self.isa}): "
                f"{'identical' if p is None else f'PSNR {p:.2f} dB'}, "
                f"max abs {self.max_abs_vs_reference:.3g} vs the Q/DQ reference semantics "
                f"(worst of {self.images} held-out images; every other figure uses the reference)")


@dataclass(frozen=True)
class Latency(Record):
    """ORT CPU median ms per model (`int8_eval.latency`), with the ratio to fp32 of the same run."""

    threads: int
    input: list[int]
    repeats: int
    median_ms: dict[str, float]
    ratio_vs_fp32: dict[str, float]

    @classmethod
    def measured(cls, threads: int, input: list[int], repeats: int, median_ms: dict[str, float]) -> Latency:
        """From `int8_eval.latency`'s figures."""
        return cls(threads, input, repeats, median_ms, {k: v / median_ms["fp32"] for k, v in median_ms.items()})


def latency(models: dict[str, Path | str], lr: np.ndarray, *, threads: int = 1, warmup: int = 2,
            repeats: int = 9) -> Latency:
    """Median ms per model, runs interleaved so load changes on a shared machine hit all alike."""
    # Native integer kernels: latency is what this CPU's runtime really does.
    x = np.ascontiguousarray(lr.transpose(2, 0, 1)[None], np.float32)
    times: dict[str, list[float]] = {k: [] for k in models}
    with contextlib.ExitStack() as stack:
        runners = {k: stack.enter_context(session(v, threads, native_int8=True)) for k, v in models.items()}
        for i in range(warmup + repeats):
            for k, r in runners.items():
                run(r, x)
                if i >= warmup:
                    times[k].append(r.last_inference_time() * 1e3)
    return Latency.measured(threads, [1, 3, *lr.shape[:2]], repeats, {k: statistics.median(v) for k, v in times.items()})
