"""What the engine builder needs to know about an ONNX file, read without TensorRT: input name and
dims, precision, the smallest input the model is meant for, and the file's sha256."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from paragon_export.artifact import sha256_file
from paragon_export.errors import ParagonError
from paragon_export.onnx_graph import graph_precision, normalise_precision

_FLOAT16 = onnx.TensorProto.FLOAT16


@dataclass(frozen=True)
class OnnxInfo:
    path: Path
    sha256: str
    input_name: str
    input_dims: tuple  # int for fixed dims, None for dynamic ones (N, C, H, W)
    input_dtype: str  # "float32" or "float16"
    output_name: str
    precision: str
    min_hw: tuple[int, int]
    meta: dict = field(default_factory=dict)
    precision_note: str = ""


def detect_precision(model: onnx.ModelProto, meta: dict | None = None) -> tuple[str, str]:
    """(precision, note): metadata_props["precision"] cross-checked against the graph.

    The graph decides: TensorRT builds what the graph says, and tools that rewrite a graph (ORT's
    quantizer, fp16 converters) copy the source's metadata unchanged, so a stale label is common.
    A disagreement is reported in the note.
    """
    meta = meta if meta is not None else {p.key: p.value for p in model.metadata_props}
    inferred = graph_precision(model)
    declared = meta.get("precision")
    if declared is None:
        return inferred, "from the graph (no precision metadata)"
    norm = normalise_precision(declared)
    if norm == inferred:
        return inferred, f"metadata precision={declared}, matches the graph"
    evidence = "it has Q/DQ nodes" if inferred == "int8" else (
        "fp16 weights or casts" if inferred == "fp16" else "no Q/DQ nodes and no fp16 tensors")
    return inferred, f"metadata says precision={declared!r} but the graph is {inferred} ({evidence}): using {inferred}"


def _parse_hw(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+))?\s*", text.lower())
    if not m:
        return None
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def min_input_hw(model: onnx.ModelProto, meta: dict) -> tuple[int, int]:
    """Smallest LR input (H, W) the model is meant for.

    Our exporter records it as metadata "min_size" ("HxW" or one number, `LoadedModel.min_size`).
    For a file without it (written elsewhere, or before it was recorded) it is the widest convolution
    kernel in the graph: a narrower input leaves that conv (ParagonSR2's 1xbk/bkx1 band convs) reading
    padding on every output pixel.
    """
    for key in ("min_size", "min_input_size"):
        if key in meta:
            hw = _parse_hw(meta[key])
            if hw is None or min(hw) < 1:
                raise ParagonError(f"bad {key!r} metadata {meta[key]!r} in the ONNX (expected HxW)")
            return hw
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    kh = kw = 1
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        ks = next((tuple(a.ints) for a in n.attribute if a.name == "kernel_shape"), None)
        if ks is None and len(n.input) > 1:
            w = n.input[1]
            src = producers.get(w)
            if src is not None and src.op_type in ("DequantizeLinear", "Cast", "Identity"):
                w = src.input[0]
            ks = inits.get(w, ())[2:]
        if len(ks) == 2:
            kh, kw = max(kh, ks[0]), max(kw, ks[1])
    return kh, kw


def _dims(value_info) -> tuple:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)


def inspect_onnx(path: Path | str) -> OnnxInfo:
    path = Path(path)
    if not path.is_file():
        raise ParagonError(f"{path} does not exist")
    try:
        # Structure only: external weights are TensorRT's business, and large models load faster.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends for a corrupt file
        raise ParagonError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    g = model.graph
    init_names = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in init_names]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ParagonError(f"{path.name} has {len(inputs)} input(s) and {len(g.output)} output(s); a ParagonSR2 "
                           "export has exactly one of each")
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise ParagonError(f"{path.name}: input {inputs[0].name!r} has rank {len(dims)}, expected NCHW (rank 4)")
    if dims[1] not in (None, 3):
        raise ParagonError(f"{path.name}: input has {dims[1]} channels; engines are built for RGB (3) models")
    elem = inputs[0].type.tensor_type.elem_type
    dtype = {onnx.TensorProto.FLOAT: "float32", _FLOAT16: "float16"}.get(elem)
    if dtype is None:
        raise ParagonError(f"{path.name}: input type {onnx.TensorProto.DataType.Name(elem)} is not float32/float16")
    meta = {p.key: p.value for p in model.metadata_props}
    precision, note = detect_precision(model, meta)
    return OnnxInfo(path=path.resolve(), sha256=sha256_file(path), input_name=inputs[0].name, input_dims=dims,
                    input_dtype=dtype, output_name=g.output[0].name, precision=precision, precision_note=note,
                    min_hw=min_input_hw(model, meta), meta=meta)
