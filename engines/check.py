"""`--check`: run an engine through Polygraphy's TensorRT runner and the fp32 ONNX through ONNX Runtime
on real photos, and compare.

The comparison loop takes any two Polygraphy runners, so it is exercised on CPU with ORT on both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from paragon_export.errors import ParagonError
from paragon_export.images import lr_hr_crops, sample_photo_paths
from paragon_export import verify
from paragon_export.verify import LIMITS, VERIFY_SIZES

from .identity import BuildOptions
from .onnx_info import OnnxInfo, inspect_onnx
from .profile import Profile

_MATCH_KEYS = ("variant", "scale", "upsampler")


def thresholds(precision: str) -> dict:
    """The limits `paragon-export parity` applies (verify.LIMITS), so a checked engine passes parity.
    fp32 engines are built with TF32 off to meet them."""
    lim = LIMITS[precision]
    return {"max_abs": lim.max_abs, "min_psnr": lim.min_psnr}


def find_reference(model: OnnxInfo, reference: Path | str | None = None) -> OnnxInfo:
    """The fp32 ONNX to compare against: given, the model itself, or its unique fp32 sibling."""
    if reference is not None:
        ref = inspect_onnx(reference)
        if ref.precision != "fp32":
            raise ParagonError(f"--reference {ref.path.name} is {ref.precision}; the check compares against fp32")
        return ref
    if model.precision == "fp32":
        return model
    found = []
    for p in sorted(model.path.parent.glob("*.onnx")):
        if p.resolve() == model.path:
            continue
        try:
            cand = inspect_onnx(p)
        except ParagonError:
            continue
        if cand.precision == "fp32" and all(cand.meta.get(k) == model.meta.get(k) for k in _MATCH_KEYS):
            found.append(cand)
    if len(found) != 1:
        why = "none" if not found else f"{len(found)} candidates"
        raise ParagonError(f"--check of a {model.precision} model compares against its fp32 ONNX, and "
                           f"{model.path.parent} has {why}: pass --reference FP32.onnx")
    return found[0]


def verdict_row(out: np.ndarray, ref: np.ndarray, precision: str) -> dict:
    """One engine output against the fp32 ONNX's, as a JSON-ready row with the verdict."""
    c = verify.compare(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    fails = c.failures(LIMITS[precision])
    if c.shape_mismatch:
        return {"max_abs": None, "mean_abs": None, "psnr": None, "finite": True, "passed": False, "why": fails[0]}
    return {"max_abs": c.max_abs, "mean_abs": c.mean_abs, "psnr": c.psnr, "finite": not c.nonfinite,
            "passed": not fails, "why": "; ".join(fails)}


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def check_inputs(profile: Profile, scale: int, *, sizes=VERIFY_SIZES) -> list[tuple[str, np.ndarray]]:
    """Real LR photo crops (bicubic from the held-out photos) at sizes inside the profile, as NCHW batches."""
    lo, hi = profile.min, profile.max
    wanted = []
    for h, w in sizes:
        hw = (_clamp(h, lo[2], hi[2]), _clamp(w, lo[3], hi[3]))
        if hw not in wanted:
            wanted.append(hw)
    batches = []
    for h, w in wanted:
        try:
            crops = lr_hr_crops(sample_photo_paths("eval"), scale, (h, w))
        except ParagonError:
            continue  # larger than the bundled photos at this scale
        arrays = [np.ascontiguousarray(lr.transpose(2, 0, 1)[None], np.float32) for _, lr, _ in crops]
        n = lo[0]
        for i, (name, _, _) in enumerate(crops):
            group = [arrays[(i + j) % len(arrays)] for j in range(n)]
            batches.append((f"{name} {h}x{w} n{n}", np.concatenate(group)))
        if hi[0] >= 2 and n < 2:
            batches.append((f"batch of 2 {h}x{w}", np.concatenate([arrays[0], arrays[-1]])))
    if not batches:
        raise ParagonError(f"profile {profile} admits no LR size the bundled photos can supply at x{scale}")
    return batches


def _scale_of(runner, info: OnnxInfo) -> int:
    if info.meta.get("scale", "").isdigit():
        return int(info.meta["scale"])
    h, w = info.min_hw
    x = np.zeros((1, 3, max(h, 8), max(w, 8)), np.float32)
    out = runner.infer({info.input_name: x})[info.output_name]
    return int(out.shape[2]) // x.shape[2]


def run_check(runner, model: OnnxInfo, ref_runner, ref: OnnxInfo, profile: Profile, precision: str) -> dict:
    """Compare `runner` (the engine) with `ref_runner` (fp32 ONNX on ORT) on real photos. Runners active."""
    scale = _scale_of(ref_runner, ref)
    in_dtype = np.float16 if model.input_dtype == "float16" else np.float32
    rows = []
    for name, x in check_inputs(profile, scale):
        expected = np.array(ref_runner.infer({ref.input_name: x})[ref.output_name], np.float32)
        got = np.array(runner.infer({model.input_name: x.astype(in_dtype)})[model.output_name], np.float32)
        rows.append({"input": name, **verdict_row(got, expected, precision)})
    finite_psnr = [r["psnr"] for r in rows if r["psnr"] is not None]
    return {"precision": precision, "reference": str(ref.path), "thresholds": thresholds(precision), "scale": scale,
            "rows": rows, "passed": all(r["passed"] for r in rows),
            "worst_psnr": min(finite_psnr) if finite_psnr else None,
            "worst_max_abs": max((r["max_abs"] for r in rows if r["max_abs"] is not None), default=None)}


def check_engine(engine_bytes: bytes, model: OnnxInfo, profile: Profile, *,
                 reference: Path | str | None = None, options: BuildOptions = BuildOptions()) -> dict:
    """Polygraphy TrtRunner on the engine vs OnnxrtRunner on the fp32 ONNX (needs TensorRT and a GPU).
    The plan is loaded by `builder.deserialize` (lean runtime, weights of a stripped plan)."""
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.logger import G_LOGGER

    from paragon_export.onnx_graph import onnx_runner

    from .builder import deserialize
    from .trt import require_tensorrt

    ref = find_reference(model, reference)
    engine = deserialize(require_tensorrt(), engine_bytes, options, model.path)
    # The plan is not written yet (a failed check writes nothing), so its runner is made from the bytes;
    # the reference runs on the ORT runner every ONNX artifact gets (`runners.open_runner` uses it too;
    # engines sit below runners, so they take it from onnx_graph).
    with G_LOGGER.verbosity(G_LOGGER.WARNING), TrtRunner(engine) as engine_runner, \
            onnx_runner(ref.path, name="reference") as ref_runner:
        return run_check(engine_runner, model, ref_runner, ref, profile, model.precision)


def format_report(report: dict) -> str:
    t = report["thresholds"]
    lim = f"PSNR >= {t['min_psnr']} dB" + (f", max abs <= {t['max_abs']:g}" if t.get("max_abs") else "")
    lines = [f"check vs {Path(report['reference']).name} on ORT CPU ({report['precision']}: {lim})"]
    for r in report["rows"]:
        if r["max_abs"] is None:
            lines.append(f"  {r['input']:<28} FAIL {r['why']}")
            continue
        lines.append(f"  {r['input']:<28} max abs {r['max_abs']:.2e}  mean abs {r['mean_abs']:.2e}  "
                     f"PSNR {r['psnr']:.2f} dB  {'ok' if r['passed'] else 'FAIL ' + r['why']}")
    return "\n".join(lines)
