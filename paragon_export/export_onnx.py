"""onnx: ParagonSR2 checkpoint -> verified, simplified ONNX FP32 (and FP16, see `fp16.py`).

API (what `int8`, `parity` and `release` call):

    export_onnx(ckpt, out_dir, recipe=ExportRecipe(opset=17, exporter="torchscript", static_shape=None,
                fp16=False, fp16_io=False, fp16_target_psnr=None (60 dB), profile="default"), *,
                variant=None, scale=None, verify_sizes=VERIFY_SIZES, calib_paths=None, force=False)
        -> {"fp32": Artifact, "fp16": Artifact (with fp16=True)}

    Loads CKPT (fused or not: an unfused one is fused first and the fusion verified as by
    `paragon-export fuse`), exports it with input "input" and output "output" (NCHW float32,
    dynamic batch/height/width unless `static_shape=(h, w)`), simplifies the graph with onnxsim,
    checks it with the ONNX full checker and verifies it on ORT CPU against the fused PyTorch model
    on real photos at every `verify_sizes` LR size (one non-square, not a multiple of 8) plus a
    batch of 2: max abs <= FP32_ATOL. Writes `{out_dir}/{variant}_x{scale}_{fp32|fp16}_op{opset}.onnx`
    atomically; if anything fails nothing is written and a ParagonError carries the figures.
    The recipe (export_recipe.py) is stored in each Artifact.meta["recipe"].
    profile="community": batch fixed to 1 (verified without the batch of 2), fp16 with fp16 I/O
    besides fp32, files `{scale}x_{checkpoint name}_{fp32|fp16}.onnx` (see export_recipe.PROFILES).

    Artifact.meta: "metadata" (the file's metadata_props), "nodes_before"/"nodes_after" (op type ->
    count), "simplify" ({"simplifier", "reason"}), "verification" (`ToleranceCheck.to_json()`), "fusion"
    (`FusionCheck.to_json()`, None for a fused input),
    and for FP16 "fp16" (kept-fp32 nodes with reasons, PSNR figures).

    export_model(model, out_path, *, meta, ...) -> Artifact: the same for an in-memory fused model.
    verify_onnx(path_or_proto, reference, scale, sizes) -> ToleranceCheck: the FP32 check alone.
    onnx_filename(variant, scale, precision, opset) -> the file name convention.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from . import __version__
from .artifact import Artifact, atomic_output, check_output
from .checkpoint import LoadedModel, load_model
from .errors import ParagonError
from .export_recipe import DEFAULT_OPSET, ExportRecipe
from .fuse import FusionCheck, verify_fusion
from .onnx_graph import (INPUT_NAME, check_and_save, OUTPUT_NAME, io_dims, name_nodes, op_counts, set_metadata, simplify)
from .verify import LIMITS, VERIFY_SIZES, ToleranceCheck, verify_against

FP32_ATOL = LIMITS["fp32"].max_abs
# Traced at a size no verification uses, so a shape baked in at trace time cannot pass.
TRACE_SHAPE = (2, 3, 40, 56)


def onnx_filename(variant: str, scale: int, precision: str, opset: int) -> str:
    return f"{variant}_x{scale}_{precision}_op{opset}.onnx"


def community_filename(source: Path | str, scale: int, precision: str) -> str:
    """`2x_<name>_fp16.onnx`, the naming of community model collections, where <name> is the
    checkpoint's file name without `_fused` and a scale tag of its own (`2x_`, `x2_`, `_x2`, `_2x`)."""
    name = Path(source).stem
    name = name[:-len("_fused")] if name.lower().endswith("_fused") else name
    for tag in (f"{scale}x_", f"x{scale}_"):
        name = name[len(tag):] if name.lower().startswith(tag) else name
    for tag in (f"_x{scale}", f"_{scale}x"):
        name = name[:-len(tag)] if name.lower().endswith(tag) else name
    return f"{scale}x_{name or 'model'}_{precision}.onnx"


def fused_model(loaded: LoadedModel) -> tuple[torch.nn.Module, FusionCheck | None]:
    """The deploy-form model: the loaded one if fused, else fused now with `fuse`'s verification."""
    if loaded.fused:
        return loaded.model, None
    try:
        fused = loaded.model.fuse_for_release().eval()
    except ValueError as e:
        raise ParagonError(f"{loaded.path}: {e} (paragon-export fuse --calibrate-kernels DIR does that)") from None
    check = verify_fusion(loaded.model, fused, loaded.scale)
    check.require_exact()
    return fused, check


# ---------------------------------------------------------------- torch -> ONNX

def _torch_export(model: torch.nn.Module, *, opset: int, exporter: str, static_shape,
                  batch1: bool = False) -> onnx.ModelProto:
    shape = TRACE_SHAPE if static_shape is None else (TRACE_SHAPE[0], 3, *static_shape)
    dummy = torch.zeros((1, *shape[1:]) if batch1 else shape)
    if exporter == "dynamo":
        return _dynamo_export(model, dummy, opset=opset, static=static_shape is not None, batch1=batch1)
    axes = {} if batch1 else {0: "batch"}
    out_axes = dict(axes)
    if not static_shape:
        axes.update({2: "height", 3: "width"})
        out_axes.update({2: "out_height", 3: "out_width"})
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
    # The exporter's shape inference mislabels the static output dims; state them.
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    fixed = ([(out_dims[0], 1)] if batch1 else []) + (list(zip(out_dims[1:], out_shape[1:])) if static_shape else [])
    for d, v in fixed:
        d.Clear()
        d.dim_value = v
    return proto


def _dynamo_export(model: torch.nn.Module, dummy: torch.Tensor, *, opset: int, static: bool,
                   batch1: bool = False) -> onnx.ModelProto:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ParagonError("--exporter dynamo needs onnxscript (pip install onnxscript); "
                           "the default torchscript exporter does not") from None
    from torch.export import Dim

    dims = {} if batch1 else {0: Dim("batch", min=1, max=1024)}
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

def verify_onnx(model: onnx.ModelProto | Path | str, reference: torch.nn.Module, scale: int, sizes=VERIFY_SIZES,
                *, atol: float = FP32_ATOL, paths=None) -> ToleranceCheck:
    """ORT CPU vs the fp32 PyTorch reference on real photos, judged by max abs <= `atol`."""
    v = verify_against(model, reference, scale, sizes, paths=paths)
    return ToleranceCheck(v.groups, v.max_abs, v.min_psnr, atol=atol, ok=bool(v.max_abs <= atol))


# ---------------------------------------------------------------- the export step

def _base_metadata(*, variant: str, scale: int, upsampler: str, opset: int, source_sha256: str,
                   source_fused: bool, exporter: str, static_shape, min_size: int, batch1: bool = False) -> dict:
    return {
        "producer": "paragon-export", "toolkit_version": __version__, "variant": variant, "scale": str(scale),
        "min_size": f"{min_size}x{min_size}",
        "upsampler": upsampler, "precision": "fp32", "io_dtype": "float32", "opset": str(opset),
        "source_sha256": source_sha256, "source_fused": "true" if source_fused else "false", "exporter": exporter,
        "input_shape": ("1" if batch1 else "N") + ("x3xHxW" if static_shape is None
                                                   else f"x3x{static_shape[0]}x{static_shape[1]}"),
        "layout": "NCHW RGB [0,1]",
    }


def _write_fp32(model: torch.nn.Module, tmp: Path, *, meta: dict, opset: int, exporter: str, static_shape,
                verify_sizes, atol: float, batch1: bool = False) -> tuple[onnx.ModelProto, dict]:
    raw = _torch_export(model, opset=opset, exporter=exporter, static_shape=static_shape, batch1=batch1)
    before = op_counts(raw)
    graph, simplify_info = simplify(raw)
    name_nodes(graph)
    set_metadata(graph, meta)
    check_and_save(graph, tmp, "exported graph")
    sizes = [tuple(static_shape)] if static_shape is not None else list(verify_sizes)
    report = verify_onnx(tmp, model, int(meta["scale"]), sizes, atol=atol)
    if not report.ok:
        raise ParagonError(f"ONNX FP32 verification failed (ORT CPU vs fused PyTorch, max abs, limit {atol:g}): "
                           f"{report.describe()}; nothing written")
    return graph, {"nodes_before": before, "nodes_after": op_counts(graph), "simplify": simplify_info,
                   "verification": report.to_json(), "io_dims": io_dims(graph)}


def export_model(model: torch.nn.Module, out_path: Path | str, *, meta: dict, opset: int = DEFAULT_OPSET,
                 exporter: str = "torchscript", static_shape=None, verify_sizes=VERIFY_SIZES,
                 atol: float = FP32_ATOL, force: bool = False) -> Artifact:
    """Export an in-memory fused model to a verified FP32 ONNX file (see the module docstring).
    `meta` needs at least "scale"; it becomes the file's metadata_props."""
    ExportRecipe(opset=opset, exporter=exporter, static_shape=static_shape).check()
    meta = {**meta, "opset": str(opset)}
    with atomic_output(out_path, force=force) as tmp:
        graph, info = _write_fp32(model, tmp, meta=meta, opset=opset, exporter=exporter, static_shape=static_shape,
                                  verify_sizes=verify_sizes, atol=atol)
    return Artifact(Path(out_path), "onnx", {"metadata": meta, **info})


def export_onnx(ckpt: Path | str, out_dir: Path | str, recipe: ExportRecipe | None = None, *,
                variant: str | None = None, scale: int | None = None, verify_sizes=VERIFY_SIZES,
                calib_paths=None, force: bool = False) -> dict[str, Artifact]:
    """Checkpoint -> verified ONNX FP32 (+ FP16). See the module docstring for the contract."""
    r = (recipe or ExportRecipe()).check()
    opset, exporter, static_shape, community = r.opset, r.exporter, r.static_shape, r.community
    loaded = load_model(ckpt, variant=variant, scale=scale)
    out_dir = Path(out_dir)
    precisions = ("fp32", "fp16") if r.fp16 else ("fp32",)
    paths = {p: out_dir / (community_filename(loaded.path, loaded.scale, p) if community
                           else onnx_filename(loaded.variant, loaded.scale, p, opset)) for p in precisions}
    for p in paths.values():
        check_output(p, force=force)
    model, check = fused_model(loaded)
    fusion = check.to_json() if check else None
    meta = _base_metadata(variant=loaded.variant, scale=loaded.scale, upsampler=loaded.upsampler, opset=opset,
                          source_sha256=loaded.sha256, source_fused=loaded.fused, exporter=exporter,
                          static_shape=static_shape, min_size=loaded.min_size, batch1=community)
    if community:
        meta["profile"] = "community"
    arts: dict[str, Artifact] = {}
    # All files or none: each is renamed into place only after every requested one verified.
    with contextlib.ExitStack() as stack:
        tmp32 = stack.enter_context(atomic_output(paths["fp32"], force=force))
        graph, info = _write_fp32(model, tmp32, meta=meta, opset=opset, exporter=exporter, static_shape=static_shape,
                                  verify_sizes=verify_sizes, atol=FP32_ATOL, batch1=community)
        arts["fp32"] = Artifact(paths["fp32"], "onnx",
                                {"metadata": meta, **info, "fusion": fusion, "recipe": (recipe or ExportRecipe()).as_dict()})
        if r.fp16:
            from .fp16 import write_fp16

            tmp16 = stack.enter_context(atomic_output(paths["fp16"], force=force))
            meta16, info16 = write_fp16(graph, tmp16, reference=model, fp32_path=tmp32,
                                        keep_io_types=not r.fp16_io, static_shape=static_shape,
                                        verify_sizes=verify_sizes, calib_paths=calib_paths,
                                        target_psnr=r.fp16_target_psnr)
            arts["fp16"] = Artifact(paths["fp16"], "onnx", {"metadata": meta16, **info16, "fusion": fusion,
                                                            "recipe": arts["fp32"].meta["recipe"]})
    return arts

