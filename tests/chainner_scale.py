"""chaiNNer's way of reading an ONNX super-resolution model's scale, for tests.

chaiNNer (backend/src/nodes/impl/onnx/load.py and utils.py `ModelShapeInference`) never runs the
model to learn its scale: it pins the input's batch (1 when dynamic) and height/width (16, else 64,
256, 512; a model that needs a larger size is recorded as "multiple of" that size), keeps the
output's declared dims, runs `onnx.shape_inference.infer_shapes(strict_mode=True)` and divides the
inferred output height/width by the input's. An error in strict inference, or an output dim that
inference cannot make concrete, means chaiNNer does not know the scale (and at 16 it asks for a
larger size multiple than the model needs).
"""

from __future__ import annotations

import copy

import onnx
from onnx.tools.update_model_dims import update_inputs_outputs_dims

CHAINNER_SIZES = (16, 64, 256, 512)


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def infer_shapes(model: onnx.ModelProto, size: int) -> tuple[list, list]:
    """(input dims, output dims) after strict ONNX shape inference with dynamic H and W pinned to
    `size`, as chaiNNer does it (NCHW, batch 1 where dynamic); raises what strict inference raises."""
    m = copy.deepcopy(model)
    i, o = m.graph.input[0], m.graph.output[0]
    b, c, h, w = _dims(i)
    pinned = [b if isinstance(b, int) and b else 1, c, h if isinstance(h, int) and h else size,
              w if isinstance(w, int) and w else size]
    update_inputs_outputs_dims(m, {i.name: pinned}, {o.name: _dims(o)})
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    return pinned, _dims(inferred.graph.output[0])


def chainner_scale(model: onnx.ModelProto | str, size: int = CHAINNER_SIZES[0]) -> int | None:
    """The scale chaiNNer reads at `size`: output W / input W when output H and W are concrete,
    divisible by the input's and agree, else None."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    (_, _, h, w), out = infer_shapes(model, size)
    oh, ow = out[2], out[3]
    if not (isinstance(oh, int) and isinstance(ow, int) and oh and ow):
        return None
    if oh % h or ow % w or oh // h != ow // w:
        return None
    return ow // w
