"""parity: every artifact vs the fp32 PyTorch reference on the same real images, through Polygraphy.

Each runner (torch CPU, ONNX Runtime CPU, TensorRT) goes through `Comparator.run` on the same LR
crops; `Comparator.compare_accuracy` with a max-abs `SimpleCompareFunc` checks each artifact
against the reference, and the report's PSNR / Y-PSNR / SSIM come from paragon_export.metrics
(Polygraphy's PsnrCompareFunc scales by the reference's maximum, not by the [0, 1] image range).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
from polygraphy.exception import PolygraphyException
from polygraphy.logger import G_LOGGER

from .artifact import check_output, sha256_file
from .checkpoint import load_model
from .errors import ParagonError, require_file
from paragon_export.calibration.sources import readable_folder

from .images import bicubic_upscale, lr_hr_crops, parse_sizes, sample_photo_paths, to_image, to_tensor
from .localize import localize as localize_onnx
from .manifest import tool_versions
from .memory import refuse_what_cannot_fit
from .metrics import psnr_y, ssim_y
from .onnx_graph import read_metadata
from .parity_report import write_outputs
from .cpu import isa
from .runners import (INPUT_NAME, RUNTIMES, RuntimeUnavailable, TorchCpuRunner, artifact_kind, engine_precision,
                      onnx_precision, onnx_runner, open_runner, resolve_runtime)

__all__ = ["parity", "classify", "onnx_precision", "DEFAULT_SIZES"]
from .verify import LIMITS, VERIFY_SIZES, Limits, compare

SCHEMA_VERSION = 1
DEFAULT_SIZES = ",".join(f"{h}x{w}" for h, w in VERIFY_SIZES)
RUNNER_LABELS = {"torch": "torch-cpu", "onnxruntime": "onnxrt-cpu", "openvino": "openvino-cpu",
                 "tensorrt": "tensorrt", "ncnn": "ncnn-cpu"}


@dataclass
class Entry:
    """One thing that runs and gets compared: the reference, a derived torch model or an artifact."""

    name: str
    role: str  # reference | derived | artifact | runtime (the same file on another runtime)
    kind: str  # torch | checkpoint | onnx | engine | ncnn
    runner: str  # RUNNER_LABELS values | onnxrt-cpu-native
    precision: str
    precision_source: str
    gated: bool = True
    path: Path | None = None
    sha256: str | None = None
    make_runner: Callable | None = None
    note: str = ""
    skip: str | None = None
    error: str | None = None
    outputs: list = field(default_factory=list)
    status: str = ""
    reasons: list = field(default_factory=list)
    results: list = field(default_factory=list)
    summary: dict | None = None
    polygraphy: dict | None = None
    localization: dict | None = None
    limits: Limits | None = None
    compat: bool = False  # a runtime row: judged PASS/FAIL, gating only when its runtime is required
    context: str = ""  # appended to a failing row's reasons (what the failure is attributed to)


def classify(path: Path) -> str:
    """checkpoint | onnx | engine | ncnn, from the one suffix table (`runners.SUFFIXES`)."""
    return artifact_kind(path)


def _unique(name: str, taken: set) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}#{i}", i + 1
    taken.add(out)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _artifact_entry(path: Path, ref_scale: int, taken: set, runtime: str | None = None, *,
                    role: str = "artifact", gated: bool = True) -> Entry:
    """One row: the artifact on `runtime` (default: its own). A runtime that cannot run here makes the
    row skipped with the install hint; a file that cannot be opened makes it an error row."""
    kind = classify(path)
    rt = resolve_runtime(path, runtime)
    require_file(path, "artifact")
    name = _unique(path.name if role == "artifact" else f"{path.name} [{rt}]", taken)
    e = Entry(name, role, kind, RUNNER_LABELS[rt], "fp32", "", gated=gated, path=path, sha256=sha256_file(path))
    try:
        runner = open_runner(path, rt, name=name)
    except RuntimeUnavailable as ex:
        e.skip = str(ex)
        if kind == "engine":
            e.precision, e.precision_source = engine_precision(path)
        return e
    except ParagonError as ex:
        e.error = str(ex)
        return e
    info = runner.info
    e.precision, e.precision_source = info.precision, info.precision_source
    e.make_runner = lambda r=runner: r
    if kind == "checkpoint":
        loaded = runner.loaded
        if loaded.scale != ref_scale:
            e.error = f"x{loaded.scale} model, but the reference is x{ref_scale}"
        e.note = f"{loaded.variant}, {'fused' if loaded.fused else 'unfused (static kernels)'}"
    elif rt == "onnxruntime" and e.precision == "int8":
        e.note = "Q/DQ reference semantics (the same on every CPU)"
    elif rt == "openvino":
        e.note, e.context = _openvino_context(e.precision)
    elif rt == "ncnn":
        from .ncnn_runner import ncnn_version

        e.note = f"ncnn {ncnn_version()} CPU on {isa()}, fp32 arithmetic ({e.precision} weights)"
    return e


def _openvino_context(precision: str) -> tuple[str, str]:
    """(note, what a failure is attributed to) for an OpenVINO row."""
    from .openvino_runner import openvino_version

    where = f"OpenVINO {openvino_version()} CPU on {isa()}"
    if precision != "int8":
        return f"{where}, f32 inference precision", ""
    # A failing row's cause is measured afterwards (`_diagnose_openvino_int8`), not assumed from the ISA.
    return (f"{where}: OpenVINO's own int8 kernels (numerics depend on the ISA)",
            f"do not ship this file to OpenVINO on {isa()} CPUs (`paragon-export int8 --openvino` writes one for it)")


def _runtime_entries(art: Entry, ref_scale: int, taken: set, runtimes, required) -> list[Entry]:
    """Rows for the same file on the other runtimes that can run it (OpenVINO for ONNX): compatibility
    rows, judged with the same limits; they gate only when their runtime is `required`."""
    if art.error or art.path is None:
        return []
    out = []
    # a file made for one runtime (the OpenVINO int8 file) is judged there, not only checked for compatibility
    target = read_metadata(art.path).get("target_runtime") if art.kind == "onnx" else None
    for rt in RUNTIMES[art.kind][1:]:
        if runtimes is not None and rt not in runtimes:
            continue
        e = _artifact_entry(art.path, ref_scale, taken, rt, role="runtime", gated=rt in required or rt == target)
        e.compat = True
        out.append(e)
    return out


def _native_int8_entry(art: Entry, taken: set) -> Entry:
    """The same int8 file through ONNX Runtime's fused integer kernels: what this CPU's runtime does,
    reported (not gated), because those numbers depend on the ISA."""
    name = _unique(f"{art.name} [native {isa()}]", taken)
    return Entry(name, "derived", "onnx", "onnxrt-cpu-native", "int8", art.precision_source, gated=False,
                 path=art.path, sha256=art.sha256,
                 make_runner=lambda p=art.path, n=name: onnx_runner(p, name=n, native_int8=True),
                 note=f"ONNX Runtime's native integer kernels on this CPU ({isa()}); differs between ISAs")


def _reference_entries(ref: Path, taken: set, scale: int | None = None):
    loaded = load_model(ref, scale=scale)
    if loaded.fused:
        fused, dynamic = loaded.model, None
    else:
        missing = loaded.model.uninitialized_kernels()
        if missing:
            raise ParagonError(f"reference {ref}: {len(missing)} tracked kernels were never initialised; "
                               "fuse it with `paragon-export fuse --calibrate-kernels DIR` and use the fused file")
        fused = loaded.model.fuse_for_release().eval()
        dynamic = loaded.model
        dynamic.set_dynamic_inference(True)
    sha = loaded.sha256
    name = _unique(f"reference ({ref.name})", taken)
    entries = [Entry(name, "reference", "torch", "torch-cpu", "fp32", "reference", gated=False, path=ref,
                     sha256=sha, make_runner=lambda: TorchCpuRunner(fused, name=name),
                     note="fp32 torch, fused (deploy form)")]
    half = _unique("torch fp16", taken)
    entries.append(Entry(half, "derived", "torch", "torch-cpu", "fp16", "torch .half() arithmetic",
                         make_runner=lambda: TorchCpuRunner(fused, name=half, dtype=torch.float16),
                         note="fused reference in torch half precision (ORT CPU fp16 upcasts internally)"))
    if dynamic is not None:
        dyn = _unique("torch dynamic (unfused)", taken)
        entries.append(Entry(dyn, "derived", "torch", "torch-cpu", "fp32", "unfused, per-image kernels", gated=False,
                             make_runner=lambda: TorchCpuRunner(dynamic, name=dyn),
                             note="per-image generated kernels as in training; the gap to the fused reference is the train/deploy gap"))
    return loaded, fused, entries


def _case_metrics(out: np.ndarray, ref: np.ndarray, hr: np.ndarray, scale: int) -> dict:
    c = compare(np.asarray(out, np.float32), ref)
    m = {"max_abs": None, "mean_abs": None, "psnr": None, "y_psnr": None, "ssim": None,
         "nonfinite": c.nonfinite, "error": None}
    if c.shape_mismatch:
        m["error"] = f"output shape {c.shape_mismatch.replace(' vs ', ' != reference ')}"
        return m
    if c.nonfinite:
        return m
    img = np.clip(to_image(out), 0.0, 1.0)
    m.update(max_abs=c.max_abs, mean_abs=c.mean_abs, psnr=None if np.isinf(c.psnr) else c.psnr,
             y_psnr=psnr_y(img, hr, scale), ssim=ssim_y(img, hr, scale))
    return m


def _summarise(entry: Entry, ref_y: float) -> dict:
    rs = entry.results
    vals = lambda k: [r[k] for r in rs if r[k] is not None]  # noqa: E731
    psnrs = vals("psnr")
    identical = [r for r in rs if r["psnr"] is None and r["max_abs"] is not None]
    y = float(np.mean(vals("y_psnr"))) if vals("y_psnr") else None
    return {
        "cases": len(rs),
        "max_abs": max(vals("max_abs")) if vals("max_abs") else None,
        "mean_abs": float(np.mean(vals("mean_abs"))) if vals("mean_abs") else None,
        # null PSNR = bit-identical to the reference on every case (infinite PSNR)
        "min_psnr": min(psnrs) if psnrs else None,
        "mean_psnr": float(np.mean(psnrs)) if psnrs else None,
        "y_psnr": y,
        "y_psnr_delta": None if y is None else y - ref_y,
        "ssim": float(np.mean(vals("ssim"))) if vals("ssim") else None,
        "nonfinite": sum(r["nonfinite"] for r in rs),
        "identical_cases": len(identical),
    }


def _verdict(entry: Entry) -> None:
    if not entry.gated and not entry.compat:
        entry.status = "info"
        return
    lim = entry.limits
    s = entry.summary
    reasons = []
    errors = sorted({r["error"] for r in entry.results if r["error"]})
    reasons += errors
    if s["nonfinite"]:
        bad = sum(1 for r in entry.results if r["nonfinite"])
        reasons.append(f"{s['nonfinite']} NaN/Inf output values in {bad} of {s['cases']} cases")
    if s["max_abs"] is not None and s["max_abs"] > lim.max_abs:
        reasons.append(f"max abs {s['max_abs']:.3g} > {lim.max_abs:g}")
    if s["min_psnr"] is not None and s["min_psnr"] < lim.min_psnr:
        reasons.append(f"PSNR {s['min_psnr']:.2f} dB < {lim.min_psnr:g} dB")
    if entry.polygraphy and not entry.polygraphy["passed"] and not reasons:
        reasons.append("Polygraphy's max-abs comparison failed")
    if reasons and entry.context:
        reasons.append(entry.context)
    entry.reasons = reasons
    entry.status = "fail" if reasons else "pass"


@contextlib.contextmanager
def _quiet_polygraphy():
    """Polygraphy logs every comparison; the report says it once. Its critical errors still raise
    (PolygraphyException), and their message goes into the report instead of the terminal."""
    severity, colors = G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.module_severity, G_LOGGER.colors = G_LOGGER.CRITICAL + 1, False
    try:
        yield
    finally:
        G_LOGGER.module_severity, G_LOGGER.colors = severity, colors


def _run(entry: Entry, feeds: list) -> RunResults | None:
    try:
        return Comparator.run([entry.make_runner()], data_loader=feeds)
    except (PolygraphyException, ParagonError, RuntimeError, ValueError, OSError) as e:
        entry.error = f"{entry.runner} could not run it: {_first_line(e)}"
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
        entry.error = f"{entry.runner} could not run it: {type(e).__name__}: {_first_line(e)}"
    return None


def parity(artifacts: list[Path | str], out_dir: Path | str, *, ref: Path | str | None = None,
           images: Path | str | None = None, sizes: str | list[tuple[int, int]] = DEFAULT_SIZES,
           atol: float | None = None, min_psnr: float | None = None, localize: bool = False,
           force: bool = False, png_crops: int = 3, scale: int | None = None,
           runtimes: tuple[str, ...] | None = None, require: tuple[str, ...] = (),
           ungated: tuple[Path | str, ...] = ()) -> dict:
    """Compare every artifact with the fp32 torch reference; write parity.json/.md and PNGs to out_dir.

    Returns the report (a dict matching schemas/parity.schema.json); report["passed"] is the gate.
    `scale` is only needed for a reference checkpoint that does not record it (traiNNer-redux).
    Every ONNX artifact also gets a row per other runtime that can run it (OpenVINO), or only for
    those in `runtimes`; such a row gates only when its runtime is in `require` (skipped if missing).
    Artifacts in `ungated` get reported rows that do not decide the result."""
    paths = [Path(a) for a in artifacts]
    inputs = [*paths, ref, images]  # the report folder replaces DIR as a whole: never over an input
    out_dir = check_output(Path(os.path.abspath(out_dir)), force=force, inputs=inputs)
    if not paths:
        raise ParagonError("no artifacts given")
    for p in paths:
        classify(p)
    if ref is None:
        ckpts = [p for p in paths if classify(p) == "checkpoint"]
        if not ckpts:
            raise ParagonError("no reference: pass --ref CHECKPOINT or list a .safetensors/.pth among the artifacts")
        ref = ckpts[0]
    ref = Path(ref)
    if classify(ref) != "checkpoint":
        raise ParagonError(f"--ref must be a .safetensors or .pth checkpoint, not {ref.name}")
    paths = [p for p in paths if not (p.exists() and ref.exists() and p.resolve() == ref.resolve())]
    size_list = parse_sizes(sizes) if isinstance(sizes, str) else [tuple(s) for s in sizes]
    thresholds = {k: Limits(atol if atol is not None else v.max_abs, min_psnr if min_psnr is not None else v.min_psnr)
                  for k, v in LIMITS.items()}

    refuse_what_cannot_fit([ref, *paths], size_list, "parity")
    taken: set = set()
    loaded, fused, entries = _reference_entries(ref, taken, scale)
    scale = loaded.scale
    smallest = 2 + -(-7 // scale)  # SSIM's 7x7 window must fit after the metrics' border of `scale` px
    if any(min(sz) < smallest for sz in size_list):
        raise ParagonError(f"--sizes: every LR side must be >= {smallest} px at x{scale} (SSIM needs a 7x7 window "
                           f"inside the {scale}-px border), got {','.join(f'{h}x{w}' for h, w in size_list)}")
    free = {os.path.abspath(u) for u in ungated}
    for p in paths:
        entries.append(_artifact_entry(p, scale, taken, gated=os.path.abspath(p) not in free))
        art = entries[-1]
        if art.kind == "onnx" and art.precision == "int8" and not art.error:
            entries.append(_native_int8_entry(art, taken))
        entries += _runtime_entries(art, scale, taken, runtimes, set(require))
    for e in entries:
        if e.gated and e.skip and e.role == "runtime" and e.runner in {RUNNER_LABELS[r] for r in require}:
            e.error, e.skip = f"required runtime: {e.skip}", None
        e.limits = thresholds[e.precision] if (e.gated or e.compat) else None

    # The user's images are all decoded first: unreadable ones are listed in the notes, not a stop midway.
    image_paths, skipped_images = readable_folder(images) if images else (sample_photo_paths("eval"), [])
    cases = [(name, size, lr, hr) for size in size_list for name, lr, hr in lr_hr_crops(image_paths, scale, size)]
    feeds = [OrderedDict([(INPUT_NAME, to_tensor(lr).numpy())]) for _, _, lr, _ in cases]

    with _quiet_polygraphy():
        results = RunResults()
        for e in entries:
            if e.skip or e.error:
                continue
            rr = _run(e, feeds)
            if rr is None:
                if e.role == "reference":
                    raise ParagonError(f"the reference failed to run: {e.error}")
                continue
            for name, iters in rr.items():
                results.append((name, iters))
                e.outputs = [np.asarray(next(iter(it.values())), np.float32) for it in iters]
        names = list(results.keys())
        for e in entries:
            if e.role == "reference" or not e.outputs or not (e.gated or e.compat):
                continue
            func = SimpleCompareFunc(check_error_stat="max", atol=e.limits.max_abs, rtol=0.0)
            acc = Comparator.compare_accuracy(results, comparisons=[(0, names.index(e.name))], compare_func=func)
            matched, _, total = acc[0].stats((names[0], e.name))
            e.polygraphy = {"compare_func": f"SimpleCompareFunc(check_error_stat=max, atol={e.limits.max_abs:g})",
                            "passed": bool(acc), "iterations_passed": int(matched), "iterations": int(total)}

    reference = entries[0]
    case_info = []
    for k, (name, size, lr, hr) in enumerate(cases):
        bic = bicubic_upscale(lr, scale)
        ref_img = np.clip(to_image(reference.outputs[k]), 0.0, 1.0)
        case_info.append({"image": name, "lr_size": list(size),
                          "bicubic_y_psnr": psnr_y(bic, hr, scale), "bicubic_ssim": ssim_y(bic, hr, scale),
                          "reference_y_psnr": psnr_y(ref_img, hr, scale), "reference_ssim": ssim_y(ref_img, hr, scale)})
    ref_y = float(np.mean([c["reference_y_psnr"] for c in case_info]))

    for e in entries:
        if e.skip:
            e.status, e.reasons = "skipped", [e.skip]
            continue
        if e.error:
            e.status, e.reasons = ("error" if e.gated or e.compat or e.role == "artifact" else "info"), [e.error]
            continue
        e.results = [{"image": c[0], "lr_size": list(c[1]), **_case_metrics(out, reference.outputs[k], c[3], scale)}
                     for k, (c, out) in enumerate(zip(cases, e.outputs))]
        e.summary = _summarise(e, ref_y)
        if e.role == "reference":
            e.status = "reference"
        else:
            _verdict(e)

    for e in entries:
        if e.runner == RUNNER_LABELS["openvino"] and e.precision == "int8" and e.status == "fail":
            _diagnose_openvino_int8(e, feeds[_worst_case(e)], thresholds["int8"].min_psnr)

    if localize:
        passing_fp32_onnx = [e.path for e in entries if e.kind == "onnx" and e.status == "pass" and e.precision == "fp32"]
        for e in entries:
            if e.kind == "onnx" and e.status == "fail":
                worst = _worst_case(e)
                try:
                    with _quiet_polygraphy():
                        e.localization = localize_onnx(e.path, e.precision, feeds[worst], torch_model=fused,
                                                       ref_onnx=passing_fp32_onnx)
                except Exception as ex:  # the verdict stands without it; say why it is missing
                    e.localization = {"method": "none", "reference": "", "layers_compared": 0, "floor": 0.0,
                                      "ratio": 0.0, "culprit": None, "sharp_jump": False, "top": [],
                                      "note": f"localization failed: {type(ex).__name__}: {_first_line(ex)}"}
                e.localization["case"] = {"image": cases[worst][0], "lr_size": list(cases[worst][1])}

    report = _report(entries, loaded, ref, image_paths, images, size_list, thresholds, atol, min_psnr,
                     case_info, ref_y)
    report["notes"] += [f"image skipped: {s}" for s in skipped_images]
    return write_outputs(report, entries, cases, scale, out_dir, force=force, png_crops=png_crops, inputs=inputs)


def _diagnose_openvino_int8(e: Entry, feed: dict, min_psnr: float) -> None:
    """Put the measured cause of a failing OpenVINO int8 row into its reasons (`openvino_int8.diagnose`)."""
    from .openvino_int8 import diagnose

    try:
        with _quiet_polygraphy():
            d = diagnose(e.path, lambda p: open_runner(p, "openvino", name="diagnose"), [feed], min_psnr)
        text = d["reason"]
    except Exception as ex:  # the verdict stands without it; say why the cause is missing
        text = f"cause not measured: {type(ex).__name__}: {_first_line(ex)}"
    e.reasons.insert(len(e.reasons) - bool(e.context), text)


def _worst_case(e: Entry) -> int:
    def badness(r):
        if r["nonfinite"] or r["error"]:
            return float("inf")
        return -(r["psnr"] if r["psnr"] is not None else 1e9)
    return max(range(len(e.results)), key=lambda k: badness(e.results[k]))


def _tool_versions(entries) -> dict:
    tv = tool_versions()
    if any(e.runner == "openvino-cpu" and not e.skip for e in entries):
        from .openvino_runner import openvino_version

        tv["openvino"] = openvino_version()
    if any(e.runner == "ncnn-cpu" and not e.skip for e in entries):
        from .ncnn_runner import ncnn_version

        tv["ncnn"] = ncnn_version()
    return tv


def _report(entries, loaded, ref, image_paths, images, sizes, thresholds, atol, min_psnr, case_info, ref_y) -> dict:
    gated = [e for e in entries if e.gated and e.role != "reference"]
    passed = all(e.status in ("pass", "skipped") for e in gated)
    arts = []
    for e in entries:
        arts.append({
            "name": e.name, "role": e.role, "kind": e.kind, "path": str(e.path) if e.path else None,
            "sha256": e.sha256, "runner": e.runner, "precision": e.precision,
            "precision_source": e.precision_source, "gated": e.gated, "status": e.status,
            "reasons": e.reasons, "note": e.note,
            "limits": None if e.limits is None else {"max_abs": e.limits.max_abs, "min_psnr": e.limits.min_psnr},
            "summary": e.summary, "polygraphy": e.polygraphy, "results": e.results, "localization": e.localization,
        })
    notes = [f"{e.name}: skipped, {e.skip}" for e in entries if e.skip]
    return {
        "schema": "paragon-export/parity",
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "passed": passed,
        "tool_versions": _tool_versions(entries),
        "reference": {"path": str(ref), "sha256": loaded.sha256, "variant": loaded.variant, "scale": loaded.scale,
                      "upsampler": loaded.upsampler, "fused": loaded.fused,
                      "runner": "torch-cpu fp32, fused" + ("" if loaded.fused else " from the unfused checkpoint")},
        "images": [{"name": p.stem, "path": str(p)} for p in image_paths],
        "image_source": "user folder" if images else "bundled held-out photos from scikit-image",
        "sizes": [list(s) for s in sizes],
        "thresholds": {k: {"max_abs": v.max_abs, "min_psnr": v.min_psnr} for k, v in thresholds.items()},
        "overrides": {"atol": atol, "min_psnr": min_psnr},
        "reference_quality": {
            "y_psnr": ref_y, "ssim": float(np.mean([c["reference_ssim"] for c in case_info])),
            "bicubic_y_psnr": float(np.mean([c["bicubic_y_psnr"] for c in case_info])),
            "bicubic_ssim": float(np.mean([c["bicubic_ssim"] for c in case_info])),
        },
        "cases": case_info,
        "artifacts": arts,
        "notes": notes,
        "outputs": {},
    }

