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
import onnx
import torch
from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
from polygraphy.exception import PolygraphyException
from polygraphy.logger import G_LOGGER

from .artifact import check_output, sha256_file
from .checkpoint import load_model
from .errors import ParagonError
from .images import bicubic_upscale, list_images, lr_hr_crops, parse_sizes, sample_photo_paths, to_image, to_tensor
from .localize import localize as localize_onnx
from .manifest import tool_versions
from .metrics import psnr_y, ssim_y
from .onnx_graph import graph_precision, normalise_precision
from .parity_report import write_outputs
from .cpu import isa
from .runners import INPUT_NAME, TorchCpuRunner, onnx_runner, tensorrt_unavailable, trt_runner
from .verify import LIMITS, VERIFY_SIZES, Limits, compare

SCHEMA_VERSION = 1
DEFAULT_SIZES = ",".join(f"{h}x{w}" for h, w in VERIFY_SIZES)
CHECKPOINT_SUFFIXES = (".safetensors", ".pth")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass
class Entry:
    """One thing that runs and gets compared: the reference, a derived torch model or an artifact."""

    name: str
    role: str  # reference | derived | artifact
    kind: str  # torch | checkpoint | onnx | engine
    runner: str  # torch-cpu | onnxrt-cpu | onnxrt-cpu-native | tensorrt
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


def classify(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    raise ParagonError(f"{path}: unknown artifact type {path.suffix!r} "
                       "(expected .safetensors/.pth, .onnx or .engine)")


def onnx_precision(model: onnx.ModelProto) -> tuple[str, str]:
    """(precision, where it came from): the "precision" metadata_props entry when the graph agrees
    with it; on a conflict the graph wins (a Q/DQ graph labelled fp32 is still int8)."""
    graph = graph_precision(model)
    evidence = {"int8": "Q/DQ nodes", "fp16": "fp16 initializers", "fp32": "fp32 initializers"}[graph]
    props = {p.key: p.value for p in model.metadata_props}
    meta = normalise_precision(props["precision"]) if "precision" in props else None
    if meta == graph:
        return graph, f"metadata precision={props['precision']}"
    if meta is not None:
        return graph, f"graph ({evidence}); metadata says precision={props['precision']}"
    return graph, f"graph ({evidence})"


def _engine_precision(path: Path) -> tuple[str, str]:
    for token, prec in (("int8", "int8"), ("qat", "int8"), ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32")):
        if token in path.name.lower():
            return prec, f"file name ({token})"
    return "fp16", "not recorded; fp16 limits used"


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


def _artifact_entry(path: Path, ref_scale: int, taken: set) -> Entry:
    kind = classify(path)
    name = _unique(path.name, taken)
    if not path.is_file():
        raise ParagonError(f"artifact {path} does not exist")
    sha = sha256_file(path)
    if kind == "checkpoint":
        e = Entry(name, "artifact", kind, "torch-cpu", "fp32", "checkpoint (fp32 torch)", path=path, sha256=sha)
        try:
            loaded = load_model(path)
        except ParagonError as ex:
            e.error = str(ex)
            return e
        if loaded.scale != ref_scale:
            e.error = f"x{loaded.scale} model, but the reference is x{ref_scale}"
        e.note = f"{loaded.variant}, {'fused' if loaded.fused else 'unfused (static kernels)'}"
        e.make_runner = lambda m=loaded.model, n=name: TorchCpuRunner(m, name=n)
        return e
    if kind == "onnx":
        e = Entry(name, "artifact", kind, "onnxrt-cpu", "fp32", "", path=path, sha256=sha)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as ex:  # protobuf DecodeError and friends: a corrupt file is this artifact's failure
            e.error = f"not a readable ONNX file: {_first_line(ex)}"
            return e
        e.precision, e.precision_source = onnx_precision(model)
        if e.precision == "int8":
            e.note = "Q/DQ reference semantics (the same on every CPU)"
        e.make_runner = lambda p=path, n=name: onnx_runner(p, name=n)
        return e
    prec, source = _engine_precision(path)
    e = Entry(name, "artifact", kind, "tensorrt", prec, source, path=path, sha256=sha)
    e.skip = tensorrt_unavailable()
    e.make_runner = lambda p=path, n=name: trt_runner(p, name=n)
    return e


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
    if not entry.gated:
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
           force: bool = False, png_crops: int = 3, scale: int | None = None) -> dict:
    """Compare every artifact with the fp32 torch reference; write parity.json/.md and PNGs to out_dir.

    Returns the report (a dict matching schemas/parity.schema.json); report["passed"] is the gate.
    `scale` is only needed for a reference checkpoint that does not record it (traiNNer-redux)."""
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

    taken: set = set()
    loaded, fused, entries = _reference_entries(ref, taken, scale)
    scale = loaded.scale
    smallest = 2 + -(-7 // scale)  # SSIM's 7x7 window must fit after the metrics' border of `scale` px
    if any(min(sz) < smallest for sz in size_list):
        raise ParagonError(f"--sizes: every LR side must be >= {smallest} px at x{scale} (SSIM needs a 7x7 window "
                           f"inside the {scale}-px border), got {','.join(f'{h}x{w}' for h, w in size_list)}")
    for p in paths:
        entries.append(_artifact_entry(p, scale, taken))
        if entries[-1].kind == "onnx" and entries[-1].precision == "int8" and not entries[-1].error:
            entries.append(_native_int8_entry(entries[-1], taken))
    for e in entries:
        e.limits = thresholds[e.precision] if e.gated else None

    image_paths = list_images(images) if images else sample_photo_paths("eval")
    if not image_paths:
        raise ParagonError(f"no images in {images}")
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
            if e.role == "reference" or not e.outputs or not e.gated:
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
            e.status, e.reasons = ("error" if e.gated or e.role == "artifact" else "info"), [e.error]
            continue
        e.results = [{"image": c[0], "lr_size": list(c[1]), **_case_metrics(out, reference.outputs[k], c[3], scale)}
                     for k, (c, out) in enumerate(zip(cases, e.outputs))]
        e.summary = _summarise(e, ref_y)
        if e.role == "reference":
            e.status = "reference"
        else:
            _verdict(e)

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
    return write_outputs(report, entries, cases, scale, out_dir, force=force, png_crops=png_crops, inputs=inputs)


def _worst_case(e: Entry) -> int:
    def badness(r):
        if r["nonfinite"] or r["error"]:
            return float("inf")
        return -(r["psnr"] if r["psnr"] is not None else 1e9)
    return max(range(len(e.results)), key=lambda k: badness(e.results[k]))


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
        "tool_versions": tool_versions(),
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

