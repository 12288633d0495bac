"""Measure INT8 models against their FP32 source on ONNX Runtime CPU: quality on the held-out images
(SPEC §6: Y-PSNR/SSIM against ground truth, border = scale; PSNR against the fp32 output) and
latency as a ratio to fp32 measured in the same run."""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

import numpy as np
from paragon_export.calibration import CalibrationSet

from .cpu import isa
from .metrics import psnr, psnr_y, ssim_y
from .onnx_graph import onnx_runner

RANK_CROPS = 8  # calibration crops the node ranking is measured on (it runs once per candidate node)


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

    def _scores(self, outs: list[np.ndarray]) -> dict:
        per = []
        for h, y, ref in zip(self.calib.holdout, outs, self.ref):
            item = {"image": h.name, "lr": list(h.lr.shape[:2]),
                    "psnr_vs_fp32": psnr(np.clip(y, 0, 1), np.clip(ref, 0, 1))}
            if h.hr is not None:
                item["y_psnr"] = psnr_y(y, h.hr, self.scale)
                item["ssim"] = ssim_y(y, h.hr, self.scale)
            per.append(item)
        mean = {k: float(np.mean([p[k] for p in per])) for k in ("psnr_vs_fp32", "y_psnr", "ssim") if per and k in per[0]}
        return {"mean": mean, "images": per}

    def quality(self, model: Path | str | bytes) -> dict:
        """Held-out scores of `model`, plus its Y-PSNR drop against fp32 (positive = worse)."""
        with session(model, self.threads) as sess:
            q = self._scores([_hwc(run(sess, h.lr)) for h in self.calib.holdout])
        if self.has_gt and q["mean"]:
            q["mean"]["y_psnr_drop"] = self.fp32["mean"]["y_psnr"] - q["mean"]["y_psnr"]
        return q

    def rank_score(self, model: Path | str | bytes) -> float:
        """PSNR against fp32 over a few calibration batches: ranks nodes without touching held-out data."""
        with session(model, self.threads) as sess:
            mse = [float(np.mean((np.clip(run(sess, x), 0, 1) - np.clip(r, 0, 1)) ** 2))
                   for x, r in zip(self.rank_inputs, self.rank_ref)]
        m = float(np.mean(mse))
        return float("inf") if m == 0 else 10.0 * np.log10(1.0 / m)


def native_vs_reference(model: Path | str | bytes, lrs: list[np.ndarray], threads: int = 1) -> dict:
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
    return {"runtime": f"onnxruntime {onnxruntime.__version__} CPU", "isa": isa(),
            "psnr_vs_reference": None if low == float("inf") else low,  # None: bit-identical
            "max_abs_vs_reference": worst, "images": len(lrs)}


def format_native(native: dict) -> str:
    p = native["psnr_vs_reference"]
    return (f"native int8 kernels ({native['runtime']}, {native['isa']}): "
            f"{'identical' if p is None else f'PSNR {p:.2f} dB'}, "
            f"max abs {native['max_abs_vs_reference']:.3g} vs the Q/DQ reference semantics "
            f"(worst of {native['images']} held-out images; every other figure uses the reference)")


def latency(models: dict[str, Path | str], lr: np.ndarray, *, threads: int = 1, warmup: int = 2,
            repeats: int = 9) -> dict:
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
    return {"threads": threads, "input": [1, 3, *lr.shape[:2]], "repeats": repeats,
            "median_ms": {k: statistics.median(v) for k, v in times.items()}}


def format_table(report: dict) -> str:
    """The report as a fixed-width table plus the mixed-precision steps."""
    q, lat, mp = report["quality"], report["latency"], report["mixed_precision"]
    ms, ratio = lat["median_ms"], lat["ratio_vs_fp32"]
    none = {"q_nodes": 0, "dq_nodes": 0}
    rows = [("fp32", q["fp32"]["mean"], "fp32", none, None, "fp32", "-"),
            (f"int8 symmetric ({report['recipe']['method']})", q["int8"]["mean"], "int8", report["checks"],
             mp.get("mac_share"), mp.get("remainder", {}).get("dtype", "fp32"), "yes")]
    for key, label in (("peer", "original: QUInt8 asym, ORT entropy"), ("modelopt", "NVIDIA ModelOpt ONNX PTQ")):
        r = report.get(key)
        if r and "quality" in r:
            rows.append((label, r["quality"]["mean"], key, r["checks"], r.get("mac_share"), r["remainder"],
                         "yes" if r["trt_compatible"] else "NO"))
    head = (f"{'model':34} {'Y-PSNR':>7} {'drop':>6} {'SSIM':>7} {'PSNR/fp32':>9} {'ms':>8} {'x fp32':>6} "
            f"{'Q/DQ':>9} {'int8 MACs':>9} {'rest':>4}  TensorRT")
    lines = [head, "-" * len(head)]
    fp32_y = q["fp32"]["mean"].get("y_psnr")
    for name, m, key, chk, share, rest, trt in rows:
        vs = "-" if key == "fp32" else f"{m['psnr_vs_fp32']:.2f}"
        y = f"{m['y_psnr']:.3f}" if "y_psnr" in m else "-"
        drop = f"{fp32_y - m['y_psnr']:.3f}" if key != "fp32" and "y_psnr" in m and fp32_y is not None else "-"
        s = f"{m['ssim']:.4f}" if "ssim" in m else "-"
        qdq = f"{chk['q_nodes']}/{chk['dq_nodes']}"
        sh = f"{100 * share['int8']:.1f}%" if share else "-"
        lines.append(f"{name:34} {y:>7} {drop:>6} {s:>7} {vs:>9} {ms[key]:8.2f} {ratio[key]:6.2f} {qdq:>9} "
                     f"{sh:>9} {rest:>4}  {trt}")
    n = len(report["calibration"]["holdout_images"])
    lines.append(f"held-out: {n} images ({', '.join(report['calibration']['holdout_images'])}), "
                 f"latency: median of {lat['repeats']} at {lat['input'][2]}x{lat['input'][3]}, {lat['threads']} thread(s)")
    if report.get("native_kernels"):
        lines.append(format_native(report["native_kernels"]))
    for key in ("peer", "modelopt"):
        r = report.get(key) or {}
        if r.get("skipped"):
            lines.append(f"{key} row skipped: {r['skipped']}")
        elif r.get("trt_blockers"):
            lines.append(f"{key} recipe is not TensorRT-compatible: {'; '.join(r['trt_blockers'])}")
    goal = " and ".join(s for s in (f"PSNR vs fp32 >= {mp['target_psnr']} dB" if mp["target_psnr"] is not None else "",
                                     f"Y-PSNR drop <= {mp['max_drop']} dB" if mp["max_drop"] is not None else "") if s)
    lines.append(f"mixed precision ({goal or 'no target'}; budget {mp['node_budget']} of {mp['quantizable_nodes']} nodes): "
                 f"{'met' if mp['met'] else 'NOT met'}")
    if "mac_share" in mp:
        sh, rest = mp["mac_share"], mp["remainder"]
        lines.append(f"conv MACs: int8 {100 * sh['int8']:.1f}%, fp16 {100 * sh['fp16']:.1f}%, fp32 {100 * sh['fp32']:.1f}% "
                     f"(remainder {rest['dtype']}"
                     + (f"; kept fp32 by the overflow guard: {', '.join(rest['kept_fp32'])})" if rest["kept_fp32"] else ")"))
    bc = mp.get("bias_correction", {})
    if bc.get("enabled"):
        w = bc["without"]
        drop = f", Y-PSNR drop {w['y_psnr_drop']:+.3f} dB" if w.get("y_psnr_drop") is not None else ""
        lines.append(f"  bias correction on {bc['nodes']} nodes; without it step 0 would be: "
                     f"PSNR vs fp32 {w['psnr_vs_fp32']:.2f} dB{drop}")
    for i, st in enumerate(mp["steps"]):
        drop = f", Y-PSNR drop {st['y_psnr_drop']:+.3f} dB" if st.get("y_psnr_drop") is not None else ""
        what = f"+ float {st['added']}" if st["added"] else "all quantized"
        back = "" if st.get("kept", True) else "  (no gain: back to int8)"
        lines.append(f"  step {i}: {what}: PSNR vs fp32 {st['psnr_vs_fp32']:.2f} dB{drop}{back}")
    return "\n".join(lines)
