"""onnx: ParagonSR2 checkpoint -> verified, simplified ONNX FP32 (and FP16, see `fp16.py`).

API (what `int8`, `parity` and `release` call):

    export_onnx(ckpt, out_dir, *, opset=17, fp16=False, fp16_io=False, exporter="torchscript",
                static_shape=None, variant=None, scale=None, verify_sizes=VERIFY_SIZES,
                calib_paths=None, fp16_target_psnr=None (60 dB), force=False)
        -> {"fp32": Artifact, "fp16": Artifact (with fp16=True)}

    Loads CKPT (fused or not: an unfused one is fused first and the fusion verified as by
    `paragon-export fuse`), exports it with input "input" and output "output" (NCHW float32,
    dynamic batch/height/width unless `static_shape=(h, w)`), simplifies the graph with onnxsim,
    checks it with the ONNX full checker and verifies it on ORT CPU against the fused PyTorch model
    on real photos at every `verify_sizes` LR size (one non-square, not a multiple of 8) plus a
    batch of 2: max abs <= FP32_ATOL. Writes `{out_dir}/{variant}_x{scale}_{fp32|fp16}_op{opset}.onnx`
    atomically; if anything fails nothing is written and a ParagonError carries the figures.

    Artifact.meta: "metadata" (the file's metadata_props), "nodes_before"/"nodes_after" (op type ->
    count), "simplify" ({"simplifier", "reason"}), "verification", "fusion" (None for a fused input),
    and for FP16 "fp16" (kept-fp32 nodes with reasons, PSNR figures).

    export_model(model, out_path, *, meta, ...) -> Artifact: the same for an in-memory fused model.
    verify_onnx(path_or_proto, reference, scale, sizes) -> report: the FP32 check alone.
    onnx_filename(variant, scale, precision, opset) -> the file name convention.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from . import __version__
from .artifact import Artifact, atomic_output, check_output
from .checkpoint import LoadedModel, load_model
from .errors import ParagonError
from .fuse import EXACT_ATOL, verify_fusion
from .images import bicubic_downscale, load_image, lr_hr_crops, sample_photo_paths
from .metrics import psnr
from .onnx_graph import (INPUT_NAME, check_and_save, OUTPUT_NAME, io_dims, name_nodes, op_counts, ort_session, run_session,
                         set_metadata, simplify)

OPSETS = range(13, 21)
DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
FP32_ATOL = 1e-4
VERIFY_SIZES = ((64, 64), (45, 77))  # LR (h, w); the second is non-square and not a multiple of 8
VERIFY_BATCH = 2
# Traced at a size no verification uses, so a shape baked in at trace time cannot pass.
TRACE_SHAPE = (2, 3, 40, 56)
# ORT intra-op threads for verification sessions (None: ORT's default, all cores). On a crowded
# machine 1 is much faster than spinning thread pools; tests set it.
VERIFY_THREADS: int | None = None


def onnx_filename(variant: str, scale: int, precision: str, opset: int) -> str:
    return f"{variant}_x{scale}_{precision}_op{opset}.onnx"


def check_options(*, opset: int, exporter: str, static_shape, fp16: bool = False, fp16_io: bool = False,
                  fp16_target_psnr: float | None = None) -> None:
    if opset not in OPSETS:
        raise ParagonError(f"opset must be {OPSETS.start}-{OPSETS.stop - 1}, got {opset}")
    if exporter not in EXPORTERS:
        raise ParagonError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if static_shape is not None and (len(static_shape) != 2 or min(static_shape) < 1):
        raise ParagonError(f"static shape must be (height, width) >= 1, got {static_shape}")
    if fp16_io and not fp16:
        raise ParagonError("--fp16-io needs --fp16")
    if fp16_target_psnr is not None and not fp16:
        raise ParagonError("--fp16-min-psnr needs --fp16")


def fused_model(loaded: LoadedModel) -> tuple[torch.nn.Module, dict | None]:
    """The deploy-form model: the loaded one if fused, else fused now with `fuse`'s verification."""
    if loaded.fused:
        return loaded.model, None
    try:
        fused = loaded.model.fuse_for_release().eval()
    except ValueError as e:
        raise ParagonError(f"{loaded.path}: {e} (paragon-export fuse --calibrate-kernels DIR does that)") from None
    report = verify_fusion(loaded.model, fused, loaded.scale)
    if report["exactness_max_abs"] > EXACT_ATOL:
        raise ParagonError(f"fusion is not exact: max abs {report['exactness_max_abs']:.3g} > {EXACT_ATOL}")
    return fused, report


# ---------------------------------------------------------------- torch -> ONNX

def _torch_export(model: torch.nn.Module, *, opset: int, exporter: str, static_shape) -> onnx.ModelProto:
    shape = TRACE_SHAPE if static_shape is None else (TRACE_SHAPE[0], 3, *static_shape)
    dummy = torch.zeros(shape)
    if exporter == "dynamo":
        return _dynamo_export(model, dummy, opset=opset, static=static_shape is not None)
    axes = {0: "batch"} if static_shape else {0: "batch", 2: "height", 3: "width"}
    out_axes = {0: "batch"} if static_shape else {0: "batch", 2: "out_height", 3: "out_width"}
    buf = io.BytesIO()
    if static_shape:
        with torch.no_grad():
            out_shape = tuple(model(dummy).shape)
    # The TorchScript exporter warns about its own deprecation and about traced shapes; a shape
    # that really got baked in is caught by verifying at sizes other than the traced one.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset, export_params=True,
                          do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: out_axes})
    proto = onnx.load_from_string(buf.getvalue())
    if static_shape:
        # The exporter's shape inference mislabels the static output dims; state them.
        for d, v in zip(proto.graph.output[0].type.tensor_type.shape.dim[1:], out_shape[1:]):
            d.Clear()
            d.dim_value = v
    return proto


def _dynamo_export(model: torch.nn.Module, dummy: torch.Tensor, *, opset: int, static: bool) -> onnx.ModelProto:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ParagonError("--exporter dynamo needs onnxscript (pip install onnxscript); "
                           "the default torchscript exporter does not") from None
    from torch.export import Dim

    dims = {0: Dim("batch", min=1, max=1024)}
    if not static:
        dims.update({2: Dim("height", min=4, max=8192), 3: Dim("width", min=4, max=8192)})
    # onnxscript's version-converter fallback logs tracebacks that are not errors, torch.onnx
    # warns about torchvision ops this network does not use.
    quiet = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (dummy,), dynamo=True, opset_version=opset, external_data=False,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=(dims,), optimize=True, verbose=False)
    except Exception as e:
        raise ParagonError(f"dynamo export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    finally:
        for q, lvl in zip(quiet, levels):
            q.setLevel(lvl)
    proto = program.model_proto
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        # The dynamo exporter raises the opset when an op needs it (Split, Pad: 18); try to convert back.
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception:
            raise ParagonError(f"the dynamo exporter wrote opset {got} and ONNX cannot convert this graph down to "
                               f"{opset}; use --opset {got} or newer, or the torchscript exporter") from None
    return proto


# ---------------------------------------------------------------- verification

def verification_inputs(scale: int, sizes, *, paths=None, batch: int = VERIFY_BATCH) -> list[tuple[str, str, np.ndarray]]:
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


def compare(outputs: dict, references: dict) -> dict:
    """Per-group worst figures of outputs vs references (both {(group, name): NCHW array}).

    Returns {"groups": {group: {max_abs, mean_abs, psnr, images} or {shape_mismatch}},
    "max_abs", "min_psnr"}; a shape mismatch makes max_abs NaN (never within a tolerance)."""
    groups: dict = {}
    for key, ref in references.items():
        out = outputs[key]
        g = groups.setdefault(key[0], {"max_abs": 0.0, "mean_abs": 0.0, "psnr": float("inf"), "images": 0})
        if out.shape != ref.shape:
            groups[key[0]] = {"shape_mismatch": f"{tuple(out.shape)} vs {tuple(ref.shape)}"}
            continue
        if "shape_mismatch" in g:
            continue
        if not np.isfinite(out).all():
            g.update(max_abs=float("inf"), mean_abs=float("inf"), psnr=float("-inf"), nonfinite=True)
            g["images"] += out.shape[0]
            continue
        d = np.abs(out.astype(np.float64) - ref)
        g["max_abs"] = max(g["max_abs"], float(d.max()))
        g["mean_abs"] = max(g["mean_abs"], float(d.mean()))
        g["psnr"] = min(g["psnr"], psnr(out, ref))
        g["images"] += out.shape[0]
    return _aggregate({"groups": groups})


def _aggregate(report: dict) -> dict:
    vals = list(report["groups"].values())
    broken = any("max_abs" not in v for v in vals) or not vals
    report["max_abs"] = float("nan") if broken else max(v["max_abs"] for v in vals)
    report["min_psnr"] = float("nan") if broken else min(v["psnr"] for v in vals)
    return report


def describe(report: dict, metric: str = "max_abs") -> str:
    """'64x64: 1.2e-06, 45x77: 9.5e-07, batch2@64x64: 1.2e-06' (or the shape mismatch / error)."""
    parts = []
    for g, v in report["groups"].items():
        if "error" in v:
            parts.append(f"{g}: {v['error']}")
        elif "shape_mismatch" in v:
            ours, ref = v["shape_mismatch"].split(" vs ")
            parts.append(f"{g}: output shape {ours}, reference {ref}")
        else:
            parts.append(f"{g}: {v[metric]:.3g}" + (" dB" if metric == "psnr" else ""))
    return ", ".join(parts)


def run_onnx(sess, inputs) -> tuple[dict, dict]:
    """ORT outputs per (group, name); groups whose run fails are returned as errors, not raised."""
    outputs, errors = {}, {}
    for group, name, x in inputs:
        try:
            outputs[(group, name)] = run_session(sess, x)
        except Exception as e:  # a baked shape or bad graph: report it as a verification figure
            errors.setdefault(group, f"ORT failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return outputs, errors


def verify_onnx(model: onnx.ModelProto | Path | str, reference: torch.nn.Module, scale: int, sizes=VERIFY_SIZES,
                *, atol: float = FP32_ATOL, paths=None) -> dict:
    """ORT CPU vs the fp32 PyTorch reference on real photos. Returns the report with "ok"."""
    inputs = verification_inputs(scale, sizes, paths=paths)
    refs = {(g, n): run_torch(reference, x) for g, n, x in inputs}
    outputs, errors = run_onnx(ort_session(model, threads=VERIFY_THREADS), inputs)
    report = compare(outputs, {k: v for k, v in refs.items() if k[0] not in errors})
    for g, msg in errors.items():
        report["groups"][g] = {"error": msg}
    _aggregate(report)
    report["atol"] = atol
    report["ok"] = bool(report["max_abs"] <= atol)
    return report


# ---------------------------------------------------------------- the export step

def _base_metadata(*, variant: str, scale: int, upsampler: str, opset: int, source_sha256: str,
                   source_fused: bool, exporter: str, static_shape) -> dict:
    return {
        "producer": "paragon-export", "toolkit_version": __version__, "variant": variant, "scale": str(scale),
        "upsampler": upsampler, "precision": "fp32", "io_dtype": "float32", "opset": str(opset),
        "source_sha256": source_sha256, "source_fused": "true" if source_fused else "false", "exporter": exporter,
        "input_shape": "Nx3xHxW" if static_shape is None else f"Nx3x{static_shape[0]}x{static_shape[1]}",
        "layout": "NCHW RGB [0,1]",
    }


def _write_fp32(model: torch.nn.Module, tmp: Path, *, meta: dict, opset: int, exporter: str, static_shape,
                verify_sizes, atol: float) -> tuple[onnx.ModelProto, dict]:
    raw = _torch_export(model, opset=opset, exporter=exporter, static_shape=static_shape)
    before = op_counts(raw)
    graph, simplify_info = simplify(raw)
    name_nodes(graph)
    set_metadata(graph, meta)
    check_and_save(graph, tmp, "exported graph")
    sizes = [tuple(static_shape)] if static_shape is not None else list(verify_sizes)
    report = verify_onnx(tmp, model, int(meta["scale"]), sizes, atol=atol)
    if not report["ok"]:
        raise ParagonError(f"ONNX FP32 verification failed (ORT CPU vs fused PyTorch, max abs, limit {atol:g}): "
                           f"{describe(report)}; nothing written")
    return graph, {"nodes_before": before, "nodes_after": op_counts(graph), "simplify": simplify_info,
                   "verification": report, "io_dims": io_dims(graph)}


def export_model(model: torch.nn.Module, out_path: Path | str, *, meta: dict, opset: int = DEFAULT_OPSET,
                 exporter: str = "torchscript", static_shape=None, verify_sizes=VERIFY_SIZES,
                 atol: float = FP32_ATOL, force: bool = False) -> Artifact:
    """Export an in-memory fused model to a verified FP32 ONNX file (see the module docstring).
    `meta` needs at least "scale"; it becomes the file's metadata_props."""
    check_options(opset=opset, exporter=exporter, static_shape=static_shape)
    meta = {**meta, "opset": str(opset)}
    with atomic_output(out_path, force=force) as tmp:
        graph, info = _write_fp32(model, tmp, meta=meta, opset=opset, exporter=exporter, static_shape=static_shape,
                                  verify_sizes=verify_sizes, atol=atol)
    return Artifact(Path(out_path), "onnx", {"metadata": meta, **info})


def export_onnx(ckpt: Path | str, out_dir: Path | str, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                fp16_io: bool = False, exporter: str = "torchscript", static_shape: tuple[int, int] | None = None,
                variant: str | None = None, scale: int | None = None, verify_sizes=VERIFY_SIZES,
                calib_paths=None, fp16_target_psnr: float | None = None, force: bool = False) -> dict[str, Artifact]:
    """Checkpoint -> verified ONNX FP32 (+ FP16). See the module docstring for the contract."""
    check_options(opset=opset, exporter=exporter, static_shape=static_shape, fp16=fp16, fp16_io=fp16_io,
                  fp16_target_psnr=fp16_target_psnr)
    loaded = load_model(ckpt, variant=variant, scale=scale)
    out_dir = Path(out_dir)
    paths = {"fp32": out_dir / onnx_filename(loaded.variant, loaded.scale, "fp32", opset)}
    if fp16:
        paths["fp16"] = out_dir / onnx_filename(loaded.variant, loaded.scale, "fp16", opset)
    for p in paths.values():
        check_output(p, force=force)
    model, fusion = fused_model(loaded)
    meta = _base_metadata(variant=loaded.variant, scale=loaded.scale, upsampler=loaded.upsampler, opset=opset,
                          source_sha256=loaded.sha256, source_fused=loaded.fused, exporter=exporter,
                          static_shape=static_shape)
    arts: dict[str, Artifact] = {}
    # All files or none: each is renamed into place only after every requested one verified.
    with contextlib.ExitStack() as stack:
        tmp32 = stack.enter_context(atomic_output(paths["fp32"], force=force))
        graph, info = _write_fp32(model, tmp32, meta=meta, opset=opset, exporter=exporter,
                                  static_shape=static_shape, verify_sizes=verify_sizes, atol=FP32_ATOL)
        arts["fp32"] = Artifact(paths["fp32"], "onnx", {"metadata": meta, **info, "fusion": fusion})
        if fp16:
            from .fp16 import write_fp16

            tmp16 = stack.enter_context(atomic_output(paths["fp16"], force=force))
            meta16, info16 = write_fp16(graph, tmp16, reference=model, fp32_path=tmp32,
                                        keep_io_types=not fp16_io, static_shape=static_shape,
                                        verify_sizes=verify_sizes, calib_paths=calib_paths,
                                        target_psnr=fp16_target_psnr)
            arts["fp16"] = Artifact(paths["fp16"], "onnx", {"metadata": meta16, **info16, "fusion": fusion})
    return arts

