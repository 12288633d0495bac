"""`engine X.engine --refit NEW.onnx`: new weights (after fine-tuning) into a refittable engine, no rebuild.

TensorRT refits only weights: the new ONNX must have the graph the engine was built from (same nodes in
the same order, same attributes, same weight shapes and types, the same nodes quantized). That is checked
first, on the ONNX files, so a mismatch is one line saying what differs instead of a TensorRT error.
The refitted plan is a new engine of the new ONNX (its own key and manifest entry); the old one stays.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import onnx

from paragon_export.artifact import Artifact, atomic_output, sha256_file
from paragon_export.errors import ParagonError

from .identity import EngineKey, engine_filename
from .manifest import put_entry
from .onnx_info import inspect_onnx

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _node_signature(node: onnx.NodeProto, inits: dict) -> str:
    attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in node.attribute
                   if a.type != onnx.AttributeProto.TENSOR)  # Constant tensors are weights too
    ins = [f"w{inits[i]}" if i in inits else "x" for i in node.input]
    return f"{node.op_type}{attrs}{ins}"


def _quantized(model: onnx.ModelProto) -> list[int]:
    """Positions of the nodes that read a DequantizeLinear output (the quantized set)."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [i for i, n in enumerate(model.graph.node) if n.op_type not in _QDQ and dq & set(n.input)]


def graph_difference(old_path: Path, new_path: Path) -> str | None:
    """What stops a refit of an engine built from `old_path` with the weights of `new_path` (None: nothing)."""
    old, new = (onnx.load(str(p), load_external_data=False) for p in (old_path, new_path))
    qo, qn = _quantized(old), _quantized(new)
    if qo != qn:
        return (f"the quantized set differs ({len(qo)} quantized nodes in the engine's ONNX, {len(qn)} in "
                f"{new_path.name}): quantize the new weights with the same recipe and kept-float nodes")
    sigs = []
    for m in (old, new):
        inits = {t.name: (tuple(t.dims), t.data_type) for t in m.graph.initializer}
        sigs.append([_node_signature(n, inits) for n in m.graph.node])
    if len(sigs[0]) != len(sigs[1]):
        return f"the graphs differ: {len(sigs[0])} nodes in the engine's ONNX, {len(sigs[1])} in {new_path.name}"
    for i, (a, b) in enumerate(zip(*sigs)):
        if a != b:
            node = new.graph.node[i]
            return (f"the graphs differ at node {i} ({node.name or node.op_type}): {a[:80]} vs {b[:80]}; a refit "
                    "changes weights only, so rebuild instead")
    return None


def refit_engine(path: Path | str, new_onnx: Path | str, *, target=None,
                 progress: Callable[[str], None] = print) -> Artifact:
    """Refit the refittable engine `path` with the weights of `new_onnx`; returns the new engine (its meta is
    its manifest entry)."""
    from .load import current_target, load_engine
    from .builder import deserialize, refit_from_onnx

    path, new_onnx = Path(path), Path(new_onnx)
    if new_onnx.suffix.lower() != ".onnx":
        raise ParagonError(f"--refit takes the fine-tuned model as ONNX ({new_onnx.name} is not): export it with "
                           "`paragon-export onnx` (and `int8` for an int8 engine) with the engine's settings first")
    new = inspect_onnx(new_onnx)
    target = target or current_target()
    data, entry = load_engine(path, target=target)
    key = EngineKey.from_dict(entry["key"])
    if not key.options.refittable:
        raise ParagonError(f"{path.name} was not built refittable: rebuild it from {new_onnx} (or build with "
                           "--refittable to refit later)")
    if new.precision != key.precision or new.input_name != key.input_name:
        raise ParagonError(f"{new_onnx.name} is {new.precision} with input {new.input_name!r}; the engine is "
                           f"{key.precision} with input {key.input_name!r}")
    why = graph_difference(Path(entry["onnx"]["path"]), new.path)
    if why:
        raise ParagonError(f"cannot refit {path.name} from {new_onnx.name}: {why}")
    trt = target.trt
    start = time.monotonic()
    engine = deserialize(trt, data, key.options, Path(entry["onnx"]["path"]))
    refit_from_onnx(trt, engine, new.path, trt.Logger(trt.Logger.WARNING))
    plan = bytes(engine.serialize())
    new_key = EngineKey(**{**key.__dict__, "onnx_sha256": new.sha256})
    out = path.parent / engine_filename(new.path.stem, new_key)
    with atomic_output(out, force=True) as tmp:
        tmp.write_bytes(plan)
    new_entry = {**entry, "file": out.name, "key": new_key.as_dict(), "engine_sha256": sha256_file(out),
                 "engine_bytes": len(plan), "refitted_from": entry["file"],
                 "onnx": {"path": str(new.path), "name": new.path.name, "meta": new.meta}}
    put_entry(path.parent, new_key.digest, new_entry)
    seconds = round(time.monotonic() - start, 2)
    progress(f"refitted {path.name} with the weights of {new_onnx.name} in {seconds} s")
    return Artifact(out, "engine", new_entry)
