"""int8_input: the FP32 model the int8 step starts from (an FP32 ONNX checked for what the recipe needs,
or a checkpoint exported on the fly), prepared for ORT's quantizer, with its upscale factor."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .errors import ParagonError, require_file
from .int8_eval import run, session
from .onnx_graph import graph_precision

MIN_OPSET = 13


def load_fp32(path: Path) -> onnx.ModelProto:
    require_file(path, "model")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf decode errors have no common base class
        raise ParagonError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0] if str(e) else e}") from None
    g = model.graph
    if len(g.input) != 1 or len(g.input[0].type.tensor_type.shape.dim) != 4:
        raise ParagonError(f"{path}: expected one NCHW image input, found {len(g.input)} inputs")
    if g.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ParagonError(f"{path}: input is not float32 (give the FP32 ONNX, not an FP16 or INT8 one)")
    precision = graph_precision(model)
    if precision != "fp32":  # an fp16 file has fp32 I/O (keep_io_types): the graph says what it is
        raise ParagonError(f"{path} is {'already quantized' if precision == 'int8' else 'an ' + precision + ' model'}: "
                           "give the FP32 ONNX")
    channels = g.input[0].type.tensor_type.shape.dim[1]
    if channels.HasField("dim_value") and channels.dim_value != 3:
        raise ParagonError(f"{path}: expected an RGB image input (N x 3 x H x W), found {channels.dim_value} channels")
    return model


def prepare(model: onnx.ModelProto, tmp: Path, src: Path) -> Path:
    """Node names (the mixed-precision loop excludes nodes by name) and opset >= 13, in a copy if needed."""
    changed = False
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
            changed = True
        seen.add(n.name)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, MIN_OPSET)
        changed = True
    if not changed:
        return src
    out = tmp / "fp32_prepared.onnx"
    onnx.save(model, str(out))
    return out


def static_dims(model: onnx.ModelProto) -> tuple[int | None, tuple[int, int] | None]:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    batch = dims[0]
    hw = (dims[2], dims[3]) if dims[2] and dims[3] else None
    return batch, hw


def infer_scale(fp32: Path, hw: tuple[int, int] | None) -> int:
    h, w = hw or (16, 20)
    try:
        with session(fp32) as sess:
            y = run(sess, np.zeros((1, 3, h, w), np.float32))
    except ParagonError:
        raise
    except Exception as e:  # ORT's own failure types: the model does not take a 1x3xHxW image
        raise ParagonError(f"{fp32}: a 1x3x{h}x{w} image does not run through it "
                           f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]})") from None
    if y.ndim != 4 or y.shape[1] != 3:
        raise ParagonError(f"{fp32}: a 1x3x{h}x{w} image gives an output of shape {list(y.shape)}, not an image")
    sh, sw = y.shape[2] / h, y.shape[3] / w
    if sh != sw or sh != int(sh) or sh < 1:
        raise ParagonError(f"cannot infer the upscale factor: {h}x{w} in, {y.shape[2]}x{y.shape[3]} out")
    return int(sh)


def from_checkpoint(ckpt: Path, tmp: Path, variant: str | None, scale: int | None,
                    progress: Callable[[str], None]) -> Path:
    progress(f"exporting {ckpt} to FP32 ONNX")
    try:
        from .export_onnx import export_onnx
    except ImportError:
        raise ParagonError(f"{ckpt} is a checkpoint; export it with `paragon-export onnx` first "
                           "and pass the .onnx") from None
    arts = export_onnx(ckpt, tmp, variant=variant, scale=scale, force=True)
    return Path(arts["fp32"].path)


def recipe_calibration_set(calib, calib_dir, r, scale: int, batch: int | None, static_hw: tuple[int, int] | None):
    """The recipe's calibration set (a static input shape fixes crops and batch), or the one given,
    checked for the model's scale and for held-out images."""
    from paragon_export.calibration import build_calibration_set

    if calib is None:
        calib = build_calibration_set(calib_dir, scale=scale, lr_size=static_hw or r.lr_size,
                                      crops_per_image=r.crops_per_image, batch_size=batch or r.batch_size,
                                      seed=r.seed, holdout=r.holdout, eval_size=static_hw or r.eval_size)
    elif calib.params["scale"] != scale:
        raise ParagonError(f"calibration set is for x{calib.params['scale']}, the model is x{scale}")
    if not calib.holdout:
        raise ParagonError("the calibration set has no held-out images to evaluate on")
    return calib
