"""The one place that says how an artifact is checked: the verification inputs (real photos at two
LR sizes), the compare function with its typed result, and the limits table every step and
`parity` apply. Imports only the core (errors, images, metrics); exporters and runners import it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ParagonError
from .images import bicubic_downscale, load_image, lr_hr_crops, sample_photo_paths
from .metrics import psnr
from .records import Record, optional

# LR (h, w): the second is non-square and not a multiple of 8, so sizes baked in at trace time or
# rounding in the output-size arithmetic cannot pass (SPEC §6).
VERIFY_SIZES = ((64, 64), (45, 77))
VERIFY_BATCH = 2
# Verification crops are small: one ORT thread beats spinning thread pools on a crowded machine.
VERIFY_THREADS = 1


@dataclass(frozen=True)
class Limits:
    max_abs: float
    min_psnr: float


# Output vs the fp32 reference, outputs in [0, 1]. fp16: 50 dB is an error RMS of 0.3 % of the range;
# int8: what a calibrated symmetric Q/DQ model of this family reaches with margin.
LIMITS = {
    "fp32": Limits(max_abs=1e-4, min_psnr=80.0),
    "fp16": Limits(max_abs=1e-2, min_psnr=50.0),
    "int8": Limits(max_abs=0.25, min_psnr=32.0),
}
# NCNN pairs (`ncnn_export`, parity's ncnn rows) run fp32 arithmetic on the CPU; they meet the same limits
# as an ONNX file of their storage precision: fp32 exactly, fp16 (fp16-rounded weights) as fp16.
NCNN_LIMITS = {"fp32": LIMITS["fp32"], "fp16": LIMITS["fp16"]}


@dataclass(frozen=True)
class Comparison:
    """One output against its reference. PSNR is +inf for identical outputs; a shape mismatch or
    NaN/Inf makes max_abs/mean_abs inf and PSNR -inf, so no tolerance can pass it."""

    max_abs: float
    mean_abs: float
    psnr: float
    nonfinite: int = 0
    shape_mismatch: str | None = None

    def failures(self, limits: Limits) -> list[str]:
        if self.shape_mismatch:
            return [f"output shape {self.shape_mismatch}"]
        out = [f"{self.nonfinite} NaN/Inf output values"] if self.nonfinite else []
        if not self.nonfinite and self.max_abs > limits.max_abs:
            out.append(f"max abs {self.max_abs:.3g} > {limits.max_abs:g}")
        if not self.nonfinite and self.psnr < limits.min_psnr:
            out.append(f"PSNR {self.psnr:.2f} dB < {limits.min_psnr:g} dB")
        return out


def compare(out: np.ndarray, ref: np.ndarray) -> Comparison:
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        return Comparison(math.inf, math.inf, -math.inf, shape_mismatch=f"{tuple(out.shape)} vs {tuple(ref.shape)}")
    bad = int(out.size - np.isfinite(out).sum())
    if bad:
        return Comparison(math.inf, math.inf, -math.inf, nonfinite=bad)
    d = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    return Comparison(float(d.max()), float(d.mean()), psnr(out, ref))


def verification_inputs(scale: int, sizes=VERIFY_SIZES, *, paths=None,
                        batch: int = VERIFY_BATCH) -> list[tuple[str, str, np.ndarray]]:
    """[(group, name, NCHW float32 LR)] from real photos: every photo at every size, plus one batch
    of `batch` photos at the first size. Photos too small for a size are bicubic-downscaled whole
    and reflect-padded, so any size (e.g. a static 720x1280 export) is verifiable."""
    paths = list(paths or sample_photo_paths("eval"))
    out = []
    for h, w in sizes:
        group = f"{h}x{w}"
        try:
            crops = [(name, lr) for name, lr, _ in lr_hr_crops(paths, scale, (h, w))]
        except ParagonError:
            crops = []
            for p in paths:
                _, lr = bicubic_downscale(load_image(p), scale)
                ph, pw = max(0, h - lr.shape[0]), max(0, w - lr.shape[1])
                lr = np.pad(lr, ((0, ph), (0, pw), (0, 0)), mode="symmetric")[:h, :w]
                crops.append((p.stem, lr))
        for name, lr in crops:
            out.append((group, name, lr.transpose(2, 0, 1)[None].copy()))
        if (h, w) == tuple(sizes[0]) and batch > 1:
            stack = np.concatenate([lr.transpose(2, 0, 1)[None] for _, lr in crops[:batch]])
            if stack.shape[0] == batch:
                out.append((f"batch{batch}@{group}", "+".join(n for n, _ in crops[:batch]), stack))
    return out


@torch.no_grad()
def run_torch(model: torch.nn.Module, x: np.ndarray, dtype=torch.float32) -> np.ndarray:
    return model(torch.from_numpy(x).to(dtype)).float().numpy()


def run_onnx(sess, inputs) -> tuple[dict, dict]:
    """ORT outputs per (group, name); groups whose run fails are returned as errors, not raised."""
    from .onnx_graph import run_session

    outputs, errors = {}, {}
    for group, name, x in inputs:
        try:
            outputs[(group, name)] = run_session(sess, x)
        except Exception as e:  # a baked shape or bad graph: report it as a verification figure
            errors.setdefault(group, f"ORT failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return outputs, errors


@dataclass
class GroupFigures(Record):
    """The worst figures of one verification group (a size, or the batch) over its images; a group
    that broke has only `shape_mismatch` or `error`."""

    max_abs: float | None = optional()
    mean_abs: float | None = optional()
    psnr: float | None = optional()
    images: int | None = optional()
    nonfinite: bool | None = optional()  # True once any output had NaN/Inf
    shape_mismatch: str | None = optional()
    error: str | None = optional()

    def add(self, c: Comparison, images: int) -> None:
        if c.nonfinite:
            self.nonfinite = True
        self.max_abs, self.mean_abs = max(self.max_abs, c.max_abs), max(self.mean_abs, c.mean_abs)
        self.psnr, self.images = min(self.psnr, c.psnr), self.images + images

    def text(self, metric: str) -> str:
        if self.error:
            return self.error
        if self.shape_mismatch:
            ours, ref = self.shape_mismatch.split(" vs ")
            return f"output shape {ours}, reference {ref}"
        return f"{getattr(self, metric):.3g}" + (" dB" if metric == "psnr" else "")


@dataclass
class Verification(Record):
    """Outputs against references group by group (`compare_groups`): the figures steps store in
    their artifact's meta and check against their limits. A broken group makes both totals NaN."""

    groups: dict[str, GroupFigures]
    max_abs: float
    min_psnr: float

    def describe(self, metric: str = "max_abs") -> str:
        """'64x64: 1.2e-06, 45x77: 9.5e-07, batch2@64x64: 1.2e-06' (or the shape mismatch / error)."""
        return ", ".join(f"{g}: {v.text(metric)}" for g, v in self.groups.items())


@dataclass
class ToleranceCheck(Verification):
    """A `Verification` judged by one max-abs tolerance (the fp32 exports)."""

    atol: float = 0.0
    ok: bool = False


def compare_groups(outputs: dict, references: dict, errors: dict | None = None) -> Verification:
    """Per-group worst figures of outputs vs references (both {(group, name): NCHW array}); groups in
    `errors` (group -> message) failed to run."""
    groups: dict[str, GroupFigures] = {}
    for key, ref in references.items():
        if errors and key[0] in errors:
            continue
        c = compare(outputs[key], ref)
        g = groups.setdefault(key[0], GroupFigures(0.0, 0.0, math.inf, 0))
        if c.shape_mismatch:
            groups[key[0]] = GroupFigures(shape_mismatch=c.shape_mismatch)
        elif not g.shape_mismatch:
            g.add(c, ref.shape[0])
    for g, msg in (errors or {}).items():
        groups[g] = GroupFigures(error=msg)
    vals = list(groups.values())
    broken = not vals or any(v.max_abs is None for v in vals)
    return Verification(groups, math.nan if broken else max(v.max_abs for v in vals),
                        math.nan if broken else min(v.psnr for v in vals))


def verify_against(model, reference: torch.nn.Module, scale: int, sizes=VERIFY_SIZES, *,
                   paths=None, dtype=torch.float32) -> Verification:
    """Run the ONNX `model` (proto or path; ORT CPU, Q/DQ reference semantics) and the torch
    `reference` on the verification inputs and compare them group by group (`compare_groups`)."""
    from .onnx_graph import ort_session

    sess = ort_session(model, threads=VERIFY_THREADS)
    inputs = verification_inputs(scale, sizes, paths=paths, batch=session_batch(sess))
    refs = {(g, n): run_torch(reference, x, dtype) for g, n, x in inputs}
    outputs, errors = run_onnx(sess, inputs)
    return compare_groups(outputs, refs, errors)


def session_batch(sess) -> int:
    """The batch to verify a session with: VERIFY_BATCH, or 1 for a graph whose batch is fixed to 1
    (the community profile's), which has no batched group to run."""
    fixed = sess.get_inputs()[0].shape[0]
    return 1 if fixed == 1 else VERIFY_BATCH
