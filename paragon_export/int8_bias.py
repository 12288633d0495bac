"""Bias correction for int8 weights (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Rounding a conv's weights to int8 changes its output on average by E[(W_q - W) x], per output
channel; for the Magic upsampler's fixed taps that is a DC-gain error (its small taps round
coarsely) that shifts image brightness. The biases stay float in the TensorRT recipe, so subtracting
that expectation from them is free at inference: E[x] per input channel is measured once on the
calibration crops, W_q is read back from the quantized model (same scales, round half to even)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from paragon_export.calibration import CalibrationSet

from .int8_check import WEIGHTED_OPS
from .onnx_graph import ort_session


def input_channel_means(fp32: onnx.ModelProto, calib: CalibrationSet, nodes: list[str]) -> dict[str, np.ndarray]:
    """Mean over the calibration crops of each input channel of each node's data input."""
    m = onnx.ModelProto()
    m.CopyFrom(fp32)
    by_name = {n.name: n for n in m.graph.node}
    tensors = sorted({by_name[n].input[0] for n in nodes})
    outputs = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in outputs:
            m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = ort_session(m)
    name = sess.get_inputs()[0].name
    sums = {t: 0.0 for t in tensors}
    for i in range(len(calib)):
        for t, y in zip(tensors, sess.run(tensors, {name: calib.batch(i)})):
            sums[t] = sums[t] + y.astype(np.float64).mean(axis=(0, 2, 3))
    return {n: sums[by_name[n].input[0]] / len(calib) for n in nodes}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return default


def _dequantized_weight(qdq: onnx.ModelProto, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(W, W_q) of a quantized node in a Q/DQ model whose weights are float -> Q -> DQ."""
    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    dq = producer.get(node.input[1])
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits:
        return None
    w = numpy_helper.to_array(inits[q.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    shape = [1] * w.ndim
    shape[_attr(dq, "axis", 1) % w.ndim] = -1
    s = scale.reshape(shape) if scale.ndim else scale
    return w, np.clip(np.rint(w / s), -128, 127) * s


def bias_deltas(qdq: onnx.ModelProto, means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """E[(W_q - W) x] per output channel for every quantized Conv/ConvTranspose in `means`."""
    out = {}
    for node in qdq.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.name not in means:
            continue
        pair = _dequantized_weight(qdq, node)
        if pair is None:
            continue
        dw = pair[1] - pair[0]
        x = means[node.name]
        groups = _attr(node, "group", 1)
        if node.op_type == "Conv":  # weight (Cout, Cin/g, kh, kw)
            cout, cin_g = dw.shape[:2]
            group_of_out = np.arange(cout) // (cout // groups)
            xin = x.reshape(groups, cin_g)[group_of_out]  # (Cout, Cin/g)
            out[node.name] = np.einsum("oikl,oi->o", dw, xin)
        else:  # ConvTranspose weight (Cin, Cout/g, kh, kw): an output pixel sees 1/(stride_h*stride_w) of the taps
            cin, cout_g = dw.shape[:2]
            strides = _attr(node, "strides", [1, 1])
            per_in = dw.sum(axis=(2, 3)) * x[:, None] / float(np.prod(strides))  # (Cin, Cout/g)
            delta = np.zeros(cout_g * groups)
            for g in range(groups):
                rows = slice(g * (cin // groups), (g + 1) * (cin // groups))
                delta[g * cout_g:(g + 1) * cout_g] = per_in[rows].sum(0)
            out[node.name] = delta
    return out


def corrected(fp32: onnx.ModelProto, deltas: dict[str, np.ndarray], skip: set[str] | list[str] = ()) -> onnx.ModelProto:
    """A copy of `fp32` whose quantized nodes (those in `deltas`, not in `skip`) carry b - delta."""
    m = onnx.ModelProto()
    m.CopyFrom(fp32)
    inits = {i.name: i for i in m.graph.initializer}
    skip = set(skip)
    for node in m.graph.node:
        if node.name not in deltas or node.name in skip:
            continue
        delta = deltas[node.name]
        if len(node.input) > 2 and node.input[2]:
            b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            inits[node.input[2]].CopyFrom(numpy_helper.from_array((b - delta).astype(np.float32), node.input[2]))
        else:
            name = f"{node.name}.bias_correction"
            m.graph.initializer.append(numpy_helper.from_array((-delta).astype(np.float32), name))
            node.input.append(name)
    return m


def undo_map(fp32: onnx.ModelProto, deltas: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """node -> (bias initializer name in the corrected model, its uncorrected value): what keeping the
    node in float must put back (its weights are then exact, so its bias must be too)."""
    inits = {i.name: i for i in fp32.graph.initializer}
    out = {}
    for node in fp32.graph.node:
        if node.name not in deltas:
            continue
        if len(node.input) > 2 and node.input[2]:
            out[node.name] = (node.input[2], numpy_helper.to_array(inits[node.input[2]]))
        else:
            out[node.name] = (f"{node.name}.bias_correction", np.zeros_like(deltas[node.name], dtype=np.float32))
    return out
