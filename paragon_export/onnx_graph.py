"""ONNX graph helpers shared by the export steps: simplification with a fallback, small exact
rewrites, metadata, node counts and ORT sessions."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ParagonError

INPUT_NAME, OUTPUT_NAME = "input", "output"


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def io_dims(model: onnx.ModelProto) -> dict[str, list]:
    """{'input': [dim_param or int, ...], 'output': [...]} of the first graph input and output."""
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {"input": dims(model.graph.input[0]), "output": dims(model.graph.output[0])}


def _constant_tensor(node: onnx.NodeProto):
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
    return None


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn tensor-valued Constant nodes into initializers (folded weights stay plain weights)."""
    graph, keep, moved = model.graph, [], 0
    outputs = {o.name for o in graph.output}
    for n in graph.node:
        value = _constant_tensor(n) if n.op_type == "Constant" and n.domain in ("", "ai.onnx") else None
        if value is None or n.output[0] in outputs:
            keep.append(n)
            continue
        graph.initializer.append(numpy_helper.from_array(value, n.output[0]))
        moved += 1
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def strip_unused_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _fold_with_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and redundant-node removal by ORT's basic (provider-independent) level."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "folded.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = out
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        folded = onnx.load(out)
    strip_unused_opsets(folded)
    return folded


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """onnxsim with dynamic dims kept; if it fails (or changes the I/O dims), fall back to ORT's basic
    constant folding, and failing that keep the graph as exported. Returns (model, info) with
    info = {"simplifier": "onnxsim"|"onnxruntime-basic"|"none", "reason": why onnxsim was not used}."""
    dims = io_dims(model)
    info: dict = {"simplifier": "onnxsim", "reason": None}
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
        if io_dims(simplified) != dims:
            raise RuntimeError(f"onnxsim changed the I/O dims to {io_dims(simplified)}")
        # onnxsim records its run in metadata_props; the file's metadata is ours.
        keep = [p for p in simplified.metadata_props if not p.key.startswith("onnxsim")]
        del simplified.metadata_props[:]
        simplified.metadata_props.extend(keep)
        info["simplifier"] = f"onnxsim {getattr(onnxsim, '__version__', '')}".strip()
    except Exception as e:  # any simplifier failure is reported, not fatal
        info["reason"] = f"onnxsim failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            simplified = _fold_with_onnxruntime(model)
            if io_dims(simplified) != dims:
                raise RuntimeError("ORT folding changed the I/O dims")
            info["simplifier"] = "onnxruntime-basic"
        except Exception as e2:
            info["reason"] += f"; ORT constant folding failed too: {type(e2).__name__}: {e2}"
            info["simplifier"] = "none"
            simplified = model
    constants_to_initializers(simplified)
    return simplified, info


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (FP16 block lists and reports refer to nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    current = {p.key: p.value for p in model.metadata_props}
    current.update({k: str(v) for k, v in meta.items()})
    del model.metadata_props[:]
    for k, v in current.items():
        model.metadata_props.add(key=k, value=v)


def read_metadata(model: onnx.ModelProto | Path | str) -> dict[str, str]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def ort_session(model: onnx.ModelProto | Path | bytes | str, *, threads: int | None = None, level=None,
                native_int8: bool = False):
    """A CPU ORT session; `threads` fixes the intra-op thread count (timings need it fixed),
    `level` the graph optimization level (default: ORT's, all).

    Q/DQ graphs run with their reference ONNX semantics (dequantize, float op, quantize) unless
    `native_int8`: ORT's fused integer kernels give CPU-dependent numbers (u8s8 saturation without
    VNNI), so every check of an int8 artifact uses the reference and native runs are reported apart."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not native_int8:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if level is not None:
        so.graph_optimization_level = level
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if isinstance(model, onnx.ModelProto):
        src = model.SerializeToString()
    else:
        src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_session(sess, x: np.ndarray) -> np.ndarray:
    """Run a single-input session; the input is cast to the graph's input dtype, output to float32."""
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    (y,) = sess.run(None, {inp.name: np.ascontiguousarray(x, dtype=dtype)})
    return y.astype(np.float32)


_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}
_FLOAT16 = onnx.TensorProto.FLOAT16


def normalise_precision(text: str) -> str | None:
    """A metadata "precision" label -> fp32 / fp16 / int8, or None when it is none of them."""
    t = text.strip().lower()
    if "int8" in t or "qat" in t or "qdq" in t:
        return "int8"
    if t in ("fp16", "float16", "half"):
        return "fp16"
    if t in ("fp32", "float32", "float"):
        return "fp32"
    return None


def graph_precision(model: onnx.ModelProto) -> str:
    """int8 if the graph quantizes (Q/DQ or integer convs), fp16 if it carries fp16 weights, casts,
    constants or I/O, else fp32. The graph, not its metadata, is what a runtime executes."""
    g = model.graph
    if {n.op_type for n in g.node} & _INT8_OPS:
        return "int8"
    if any(t.data_type == _FLOAT16 for t in g.initializer):
        return "fp16"
    for n in g.node:
        if n.op_type == "Cast" and any(a.name == "to" and a.i == _FLOAT16 for a in n.attribute):
            return "fp16"
        if n.op_type == "Constant" and any(a.name == "value" and a.t.data_type == _FLOAT16 for a in n.attribute):
            return "fp16"
    if any(v.type.tensor_type.elem_type == _FLOAT16 for v in list(g.input) + list(g.output)):
        return "fp16"
    return "fp32"


def check_and_save(model: onnx.ModelProto, path: Path | str, what: str) -> None:
    """`onnx.checker` full check, then save; a graph that fails is never written."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ParagonError(f"{what} fails the ONNX checker: {str(e).splitlines()[0]}") from None
    onnx.save(model, str(path))


# Multiply-accumulate count per weighted node. Weight input index per op; the weight's dims after
# the first give the MACs per output value (Conv family) or per input value (ConvTranspose).
_MAC_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1}


def graph_macs(model: onnx.ModelProto, hw: tuple[int, int], batch: int = 1) -> dict[str, float]:
    """Multiply-accumulates of every Conv/ConvInteger/QLinearConv/ConvTranspose node for a
    `batch`x3x`hw` input, by node name (unnamed: '#index op'). Shapes come from ONNX shape inference;
    where it cannot follow the graph (e.g. kernels computed in-graph before simplification), from one
    ONNX Runtime inference at that size, so a node is never silently counted as 0. Ops without
    weights (Add, Pad, DepthToSpace, ...) count 0: they move data, they do not multiply-accumulate."""
    weighted = [(i, n) for i, n in enumerate(model.graph.node) if n.op_type in _MAC_WEIGHT_INPUT]
    needed = {t for _, n in weighted
              for t in (n.input[_MAC_WEIGHT_INPUT[n.op_type]], n.input[0] if n.op_type == "ConvTranspose" else n.output[0])}
    shapes = tensor_shapes(model, hw, batch, needed)
    macs = {}
    for i, n in weighted:
        w = shapes.get(n.input[_MAC_WEIGHT_INPUT[n.op_type]])
        # Conv: (Cin/groups)*kh*kw per output value; ConvTranspose: (Cout/groups)*kh*kw per input value
        values = shapes.get(n.input[0] if n.op_type == "ConvTranspose" else n.output[0])
        macs[n.name or f"#{i} {n.op_type}"] = float(np.prod(values)) * int(np.prod(w[1:]))
    return macs


def tensor_shapes(model: onnx.ModelProto, hw: tuple[int, int], batch: int = 1, needed=None) -> dict[str, list[int]]:
    """Every tensor's shape for a `batch`x3x`hw` input, from ONNX shape inference; the `needed` ones
    (default: every node input and output) it cannot follow come from one ONNX Runtime inference."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (batch, dims[1].dim_value or 3, *hw)):
        d.Clear()
        d.dim_value = v
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # fall back to the runtime for every shape
        pass
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    shapes.update({i.name: list(i.dims) for i in m.graph.initializer})
    if needed is None:
        needed = {t for n in model.graph.node for t in (*n.input, *n.output) if t}
    unknown = sorted(t for t in needed if not shapes.get(t) or not all(shapes[t]))
    if unknown:
        shapes.update(_runtime_shapes(model, unknown, (batch, dims[1].dim_value or 3, *hw)))
    return shapes


def _runtime_shapes(model: onnx.ModelProto, names: list[str], shape: tuple) -> dict[str, list[int]]:
    """Shapes of the tensors `names` in one ORT inference of a zero input of `shape`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in have)
    sess = ort_session(m, threads=1)
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    out = sess.run(names, {inp.name: np.zeros(shape, dtype)})
    return {t: list(v.shape) for t, v in zip(names, out)}


def macs_per_pixel(model: onnx.ModelProto, hw: tuple[int, int]) -> float | None:
    """Total multiply-accumulates of one 1x3x`hw` inference per LR input pixel (None: not countable)."""
    macs = graph_macs(model, hw)
    total = sum(macs.values())
    return total / (hw[0] * hw[1]) if total else None
