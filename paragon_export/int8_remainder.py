"""The part of an INT8 model that is not quantized: fp16 by default, fp32 on request.

TensorRT builds networks strongly typed (always on 11, by our choice on 10), so an engine runs
exactly the ONNX's types: an fp32 remainder would run in fp32, next to a faster fp16 engine. The
remainder goes through the fp16 pass (`fp16.convert`, fp32 I/O) with its overflow guard: nodes whose
activations or weights leave the safe fp16 range on calibration crops stay fp32, with the Q/DQ
nodes that feed them. QuantizeLinear/DequantizeLinear take fp16 inputs and scales from opset 19
(ModelOpt's ONNX PTQ raises the opset the same way for its fp16 remainder)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import ParagonError
from .int8_check import WEIGHTED_OPS

REMAINDERS = ("fp16", "fp32")
FP16_QDQ_OPSET = 19
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Remainder:
    dtype: str  # fp16 | fp32
    kept_fp32: dict[str, str] = field(default_factory=dict)  # node -> why (overflow guard)
    big_tensors: set[str] = field(default_factory=set)

    def apply(self, qdq: onnx.ModelProto) -> onnx.ModelProto:
        """The Q/DQ model with its float remainder in this dtype (a new proto for fp16)."""
        if self.dtype == "fp32":
            return qdq
        from .fp16 import convert

        opset = max((o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if opset < FP16_QDQ_OPSET:
            from onnx import version_converter

            qdq = version_converter.convert_version(qdq, FP16_QDQ_OPSET)
        return convert(qdq, sorted(self._blocked(qdq)), keep_io_types=True)

    def _blocked(self, qdq: onnx.ModelProto) -> set[str]:
        """Kept nodes plus the Q/DQ chains that feed them or carry an out-of-range tensor."""
        producer = {o: n for n in qdq.graph.node for o in n.output}
        blocked = {n.name for n in qdq.graph.node if n.name in self.kept_fp32}
        for n in qdq.graph.node:
            if n.op_type == "QuantizeLinear" and n.input[0] in self.big_tensors:
                blocked.add(n.name)
        # A pair shares its scale: a Q kept fp32 keeps the DequantizeLinear nodes reading it fp32 too.
        blocked |= {n.name for n in qdq.graph.node
                    if n.op_type == "DequantizeLinear" and producer.get(n.input[0]) is not None
                    and producer[n.input[0]].name in blocked}
        for n in qdq.graph.node:
            if n.name not in blocked:
                continue
            todo = [producer[t] for t in n.input if t in producer]
            while todo:
                p = todo.pop()
                if p.op_type in _QDQ and p.name not in blocked:
                    blocked.add(p.name)
                    todo.extend(producer[t] for t in p.input if t in producer)
        return blocked

    def summary(self) -> dict:
        return {"dtype": self.dtype, "kept_fp32": dict(self.kept_fp32)}


def plan_remainder(dtype: str, fp32: onnx.ModelProto, calib_inputs: list[np.ndarray]) -> Remainder:
    """Decide, on the fp32 graph and calibration crops, which float nodes must stay fp32."""
    if dtype not in REMAINDERS:
        raise ParagonError(f"--remainder must be one of {', '.join(REMAINDERS)}, got {dtype!r}")
    if dtype == "fp32":
        return Remainder("fp32")
    from .fp16 import FP16_SAFE_ABS, overflow_blocks

    kept, peak = overflow_blocks(fp32, calib_inputs)
    return Remainder("fp16", kept, {t for t, v in peak.items() if v > FP16_SAFE_ABS})


def dtype_mac_shares(model: onnx.ModelProto, shares: dict[str, float]) -> dict[str, float]:
    """Share of the conv MACs (`int8_check.mac_shares` of the fp32 graph) run in int8, fp16 and fp32:
    int8 when the weight comes through a DequantizeLinear, else the weight initializer's dtype."""
    producer = {o: n for n in model.graph.node for o in n.output}
    init_type = {i.name: i.data_type for i in model.graph.initializer}
    out = {"int8": 0.0, "fp16": 0.0, "fp32": 0.0}
    for n in model.graph.node:
        if n.op_type not in WEIGHTED_OPS:
            continue
        w = producer.get(n.input[1])
        if w is not None and w.op_type == "DequantizeLinear":
            kind = "int8"
        elif w is not None and w.op_type == "Cast":
            kind = "fp16" if any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in w.attribute) else "fp32"
        else:
            kind = "fp16" if init_type.get(n.input[1]) == onnx.TensorProto.FLOAT16 else "fp32"
        out[kind] += shares.get(n.name, 0.0)
    return out
