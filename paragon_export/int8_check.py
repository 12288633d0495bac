"""Read back a Q/DQ ONNX model: node counts, zero points, per-channel weights, and what keeps it from
TensorRT explicit quantization (which needs int8 symmetric Q/DQ: zero point 0, per-channel weights on
the output-channel axis, opset >= 13, no int32 bias DequantizeLinear, no ORT-only ops)."""

from __future__ import annotations

import collections
import contextlib
import io
import logging

import numpy as np
import onnx
from onnx import numpy_helper

from .onnx_graph import graph_macs

WEIGHTED_OPS = {"Conv": 0, "ConvTranspose": 1}  # op -> output-channel axis of its weight
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _axis(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return 1  # ONNX default


def inspect_qdq(model: onnx.ModelProto) -> dict:
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    init_types = {i.name: i.data_type for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)

    bad_zero_points, zp_types = [], set()
    for n in g.node:
        if n.op_type not in QDQ_OPS:
            continue
        if len(n.input) < 3 or not n.input[2]:
            zp_types.add("uint8 (default)")
            bad_zero_points.append(f"{n.name}: no zero point (defaults to uint8)")
            continue
        if n.input[2] not in inits:
            bad_zero_points.append(f"{n.name}: zero point is not a constant")
            continue
        zp_types.add(onnx.helper.tensor_dtype_to_np_dtype(init_types[n.input[2]]).name)
        if np.any(inits[n.input[2]] != 0):
            bad_zero_points.append(f"{n.name}: zero point {inits[n.input[2]].reshape(-1)[:4].tolist()}")

    quantized, float_nodes, per_tensor, int32_dq = [], [], [], []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init_types \
                and init_types[n.input[0]] == onnx.TensorProto.INT32:
            int32_dq.append(n.name)
        if n.op_type not in WEIGHTED_OPS:
            continue
        w_dq = producer.get(n.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            float_nodes.append(n.name)
            continue
        quantized.append(n.name)
        src = w_dq.input[0]
        q = producer.get(src)
        weight = inits.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else inits.get(src)
        scale = inits.get(w_dq.input[1])
        want = WEIGHTED_OPS[n.op_type]
        axis = _axis(w_dq) % weight.ndim if weight is not None else None
        if weight is None or scale is None or scale.ndim != 1 or axis != want or scale.size != weight.shape[want]:
            per_tensor.append(n.name)

    ops = collections.Counter(n.op_type for n in g.node)
    return {
        "opset": opset,
        "q_nodes": ops.get("QuantizeLinear", 0),
        "dq_nodes": ops.get("DequantizeLinear", 0),
        "zero_point_types": sorted(zp_types),
        "zero_points_all_zero": not bad_zero_points,
        "bad_zero_points": bad_zero_points[:10],
        "weights_per_channel": bool(quantized) and not per_tensor,
        "per_tensor_weights": per_tensor,
        "int32_bias_dq": len(int32_dq),
        "quantized_nodes": quantized,
        "float_nodes": float_nodes,
        "op_counts": dict(sorted(ops.items())),
        "foreign_domains": sorted({n.domain for n in g.node if n.domain not in ("", "ai.onnx")}),
    }


def trt_blockers(info: dict) -> list[str]:
    """Why TensorRT's explicit-quantization path would reject or mis-handle this model (empty: none)."""
    out = []
    if info["opset"] < 13:
        out.append(f"opset {info['opset']} < 13 (per-channel Q/DQ needs 13)")
    if not info["zero_points_all_zero"]:
        out.append("non-zero zero points (asymmetric quantization)")
    if any(t != "int8" for t in info["zero_point_types"]):
        out.append(f"Q/DQ types {', '.join(info['zero_point_types'])} (TensorRT needs int8)")
    if info["per_tensor_weights"]:
        out.append(f"{len(info['per_tensor_weights'])} weights not per-channel on the output-channel axis")
    if info["int32_bias_dq"]:
        out.append(f"{info['int32_bias_dq']} int32 bias DequantizeLinear nodes")
    if info["foreign_domains"]:
        out.append(f"ops from {', '.join(info['foreign_domains'])}")
    if not info["q_nodes"]:
        out.append("no Q/DQ nodes")
    return out


def mac_shares(model: onnx.ModelProto, hw: tuple[int, int] = (64, 64)) -> dict[str, float]:
    """Each Conv/ConvTranspose node's share of the model's multiply-accumulates at an `hw` input: what
    keeping it in float costs (the HR-resolution convs of an SR model dominate)."""
    macs = graph_macs(model, hw)
    total = sum(macs.values())
    return {k: v / total for k, v in macs.items()} if total else {}


def trt_int8_exclusions(model: onnx.ModelProto) -> dict[str, str]:
    """Convs TensorRT has no efficient int8 kernel for, each with the rule that excludes it. The rules
    are NVIDIA ModelOpt's for int8 ONNX quantization (modelopt 0.47,
    `modelopt/onnx/quantization/graph_utils.py::find_nodes_from_convs_to_exclude`): a Conv with fewer
    than 16 input or output channels is int8 only as (a) a dense conv with 8-aligned input or output
    channels, a square kernel, and either the graph input or >= 16 channels on one side, or (b) a
    grouped conv with 8-aligned output channels and every kernel dim >= 3; a computed weight is never
    quantized. ConvTranspose has no channel rule there. Such convs run fp16 instead: int8 buys
    nothing and costs accuracy."""
    g = model.graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    out = {}
    for n in g.node:
        if n.op_type != "Conv":
            continue
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        if w is None:
            out[n.name] = "computed weight"
            continue
        oc, ic = w[0], w[1]
        if oc >= 16 and ic >= 16:
            continue
        attrs = {a.name: (list(a.ints) if a.ints else a.i) for a in n.attribute}
        group, kernel = attrs.get("group", 1) or 1, attrs.get("kernel_shape", w[2:])
        dense_ok = (group == 1 and (oc % 8 == 0 or ic % 8 == 0) and len(set(kernel)) == 1
                    and (n.input[0] in graph_inputs or oc >= 16 or ic >= 16))
        grouped_ok = group > 1 and oc % 8 == 0 and all(k >= 3 for k in kernel)
        if not (dense_ok or grouped_ok):
            kind = "depthwise" if group > 1 else "dense"
            out[n.name] = (f"{kind} {ic * group}->{oc} channels, kernel {'x'.join(map(str, kernel))}: "
                           "no TensorRT int8 kernel (ModelOpt's small-channel rule)")
    return out


@contextlib.contextmanager
def quiet_quantizer():
    """ORT's quantizer prints progress and warns on every call through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def brief(checks: dict) -> dict:
    """`inspect_qdq`'s figures with the quantized node list as its length (for reports)."""
    return {k: v for k, v in checks.items() if k != "quantized_nodes"} | {"quantized_nodes": len(checks["quantized_nodes"])}
