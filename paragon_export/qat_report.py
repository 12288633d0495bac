"""qat_report: the QAT report. Held-out quality of the torch student in the int8 report's format,
and the fp32 / PTQ / QAT table the command prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .metrics import psnr, psnr_y, ssim_y
from .qat_export import REMAINDER_MIN_PSNR
from .verify import describe


@torch.no_grad()
def _sr(model, lr: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None]).numpy()[0].transpose(1, 2, 0)


def torch_quality(model, holdout, scale: int, fp32_ref: list[np.ndarray] | None) -> dict:
    """Held-out figures of a torch model in the int8 report's format (`int8_eval.Evaluator`):
    Y-PSNR/SSIM vs HR and PSNR vs the fp32 outputs `fp32_ref`, per image and mean."""
    per = []
    for i, h in enumerate(holdout):
        y = _sr(model, h.lr)
        item = {"image": h.name, "lr": list(h.lr.shape[:2])}
        if fp32_ref is not None:
            item["psnr_vs_fp32"] = psnr(np.clip(y, 0, 1), np.clip(fp32_ref[i], 0, 1))
        if h.hr is not None:
            item["y_psnr"] = psnr_y(y, h.hr, scale)
            item["ssim"] = ssim_y(y, h.hr, scale)
        per.append(item)
    mean = {k: float(np.mean([p[k] for p in per])) for k in ("psnr_vs_fp32", "y_psnr", "ssim") if per and k in per[0]}
    return {"mean": mean, "images": per}


def with_drop(q: dict, fp32: dict) -> dict:
    if "y_psnr" in q["mean"] and "y_psnr" in fp32["mean"]:
        q["mean"]["y_psnr_drop"] = fp32["mean"]["y_psnr"] - q["mean"]["y_psnr"]
    return q


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def build_report(*, job, run, extra: dict, graph, info: dict, fp32_graph, fp32_path: Path, qat_path: Path, ev,
                 excluded: dict, rest, verification: dict, verify_min_psnr: float, threads: int,
                 start_step: int | None, train_s: float, progress) -> dict:
    """The report of a finished run (`qat.qat`'s `_Job`, `qat_run.QATRun`): quality of every model on the
    held-out images, ORT CPU latency, the recipe, checks, training history and verification."""
    from .int8_check import inspect_qdq, mac_shares
    from .int8_eval import latency, native_vs_reference
    from .int8_remainder import dtype_mac_shares

    loaded, cal, s = job.loaded, job.cal, job.recipe
    ptq, ptq_modelopt = extra["ptq"], extra["ptq_modelopt"]
    info.pop("checks")
    checks = inspect_qdq(graph)
    quality = {"fp32": ev.fp32, "ptq_modelopt": ptq_modelopt,
               "qat_torch": with_drop(torch_quality(run.student, cal.holdout, loaded.scale, ev.ref), ev.fp32),
               "qat_int8": ev.quality(qat_path)}
    models = {"fp32": fp32_path, "qat_int8": qat_path}
    if ptq is not None:
        quality["ptq_int8"] = ptq["quality"]
        if Path(ptq["model"]).is_file():
            models["ptq_int8"] = Path(ptq["model"])
    progress("timing on ONNX Runtime CPU")
    lat = latency(models, cal.holdout[0].lr, threads=threads)
    lat["ratio_vs_fp32"] = {k: v / lat["median_ms"]["fp32"] for k, v in lat["median_ms"].items()}
    first = start_step if start_step is not None else 0
    return {
        "command": "qat",
        "model": {"source": str(loaded.path), "source_sha256": loaded.sha256, "variant": loaded.variant,
                  "scale": loaded.scale, "upsampler": loaded.upsampler, "fusion": job.fusion},
        "calibration": cal.summary(),
        "recipe": {"tool": "nvidia-modelopt", "format": "QDQ", "calibrator": "max",
                   "activations": "int8 symmetric (zero point 0), per tensor",
                   "weights": "int8 symmetric, per-channel (Conv axis 0, ConvTranspose axis 1)",
                   "bias": "float", "quantized_ops": ["Conv", "ConvTranspose"], "output_quantization": False,
                   "magic_filters": s.magic, "trt_excluded": excluded, "remainder": rest.summary(),
                   "mac_share": dtype_mac_shares(graph, mac_shares(fp32_graph)), "float_quantizers": extra["keep_float"],
                   "unmatched_float_nodes": extra["unmatched_float_nodes"], "trt_compatible": True,
                   "options": s.as_dict()},
        "checks": {k: v for k, v in checks.items() if k != "quantized_nodes"}
                  | {"quantized_nodes": len(checks["quantized_nodes"])},
        "export": info,
        "training": {"steps": run.step, "resumed_from": start_step,
                     "steps_this_run": run.step - first, "train_seconds": round(train_s, 2),
                     "seconds_per_step": round(train_s / max(1, run.step - first), 4),
                     "lr": s.lr, "schedule": "cosine to 0", "batch": s.batch,
                     "patch": s.patch, "gt_weight": s.gt_weight,
                     "loss": "L1 to the fp32 teacher" + (f" + {s.gt_weight} x L1 to HR" if s.gt_weight else ""),
                     "train_patches": int(len(job.patches.lr)), "history": run.history},
        "verification": {**verification, "min_psnr_limit": verify_min_psnr, "reference": "torch fake-quant student",
                         "remainder_min_psnr_limit": REMAINDER_MIN_PSNR,
                         "runtime": "onnxruntime CPU, Q/DQ reference semantics"},
        "native_kernels": native_vs_reference(qat_path, [h.lr for h in cal.holdout], threads),
        "quality": quality,
        "ptq": ptq,
        "latency": lat,
    }


def format_table(report: dict) -> str:
    """fp32 / PTQ / QAT side by side, in the int8 command's table layout."""
    q, lat = report["quality"], report["latency"]
    ms, ratio = lat["median_ms"], lat["ratio_vs_fp32"]
    chk = report["checks"]
    rows = [("fp32 (ONNX)", q["fp32"]["mean"], "fp32", "-", "-", "-")]
    if "ptq_int8" in q:
        p = report["ptq"]
        rows.append((f"PTQ int8 (int8 command, {p['method']})", q["ptq_int8"]["mean"], "ptq_int8",
                     f"{p['checks']['q_nodes']}/{p['checks']['dq_nodes']}", str(len(p["kept_float"])), "yes"))
    rows.append(("PTQ int8 (ModelOpt max, torch)", q["ptq_modelopt"]["mean"], None, "-", "-", "-"))
    rows.append((f"QAT int8 ({report['training']['steps']} steps)", q["qat_int8"]["mean"], "qat_int8",
                 f"{chk['q_nodes']}/{chk['dq_nodes']}", str(len(chk["float_nodes"])),
                 "yes" if not report["export"]["trt_blockers"] else "NO"))
    head = f"{'model':34} {'Y-PSNR':>7} {'SSIM':>7} {'PSNR/fp32':>9} {'ms':>8} {'x fp32':>6} {'Q/DQ':>9} {'float':>5}  TensorRT"
    lines = [head, "-" * len(head)]
    for name, m, key, qdq, kept, trt in rows:
        vs = "-" if name.startswith("fp32") else f"{m['psnr_vs_fp32']:.2f}"
        y = f"{m['y_psnr']:.3f}" if "y_psnr" in m else "-"
        s = f"{m['ssim']:.4f}" if "ssim" in m else "-"
        t = f"{ms[key]:8.2f} {ratio[key]:6.2f}" if key in ms else f"{'-':>8} {'-':>6}"
        lines.append(f"{name:34} {y:>7} {s:>7} {vs:>9} {t} {qdq:>9} {kept:>5}  {trt}")
    n = len(report["calibration"]["holdout_images"])
    lines.append(f"held-out: {n} images ({', '.join(report['calibration']['holdout_images'])}), "
                 f"latency: median of {lat['repeats']} at {lat['input'][2]}x{lat['input'][3]}, {lat['threads']} thread(s)")
    fp = q["fp32"]["mean"].get("y_psnr")
    if fp is not None:
        gains = [f"QAT vs fp32 {q['qat_int8']['mean']['y_psnr'] - fp:+.3f} dB"]
        if "ptq_int8" in q:
            gains.append(f"QAT vs PTQ {q['qat_int8']['mean']['y_psnr'] - q['ptq_int8']['mean']['y_psnr']:+.3f} dB")
        lines.append("Y-PSNR: " + ", ".join(gains))
    sh = report["recipe"].get("mac_share")
    if sh:
        lines.append(f"QAT conv MACs: int8 {100 * sh['int8']:.1f}%, fp16 {100 * sh['fp16']:.1f}%, "
                     f"fp32 {100 * sh['fp32']:.1f}% ({len(chk['float_nodes'])} convs without a TensorRT int8 kernel)")
    v = report["verification"]
    sizes = ", ".join(f"{g}: max abs {r['max_abs']:.2e}, PSNR {r['psnr']:.1f} dB" for g, r in v["groups"].items()
                      if "max_abs" in r)
    lines.append(f"ORT (Q/DQ reference semantics) vs torch fake quant, fp32 remainder: {sizes}")
    if v.get("remainder"):
        lines.append(f"fp16 remainder vs fp32 remainder (ORT): {describe(v['remainder'], 'psnr')}")
    if report.get("native_kernels"):
        from .int8_eval import format_native

        lines.append(format_native(report["native_kernels"]))
    return "\n".join(lines)
