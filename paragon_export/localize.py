"""localize: name the first layer of a failing ONNX artifact whose error jumps.

Every intermediate tensor of the artifact is marked as an output (Polygraphy's ModifyOutputs with
MARK_ALL) and compared, in graph order, against the same tensor of a reference: a passing fp32 ONNX
with the same tensor names when one is available, else the fp32 torch reference through forward
hooks on the modules the TorchScript exporter named the nodes after ("/body/body.0/blocks/blocks.1/
transformer/project_in/Conv" -> body.0.blocks.1.transformer.project_in). The first tensor whose
relative error exceeds a floor and is JUMP_RATIO times the worst error before it is the culprit,
as `polygraphy debug` bisects to the first bad layer.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import torch
from polygraphy import constants
from polygraphy.backend.onnx import ModifyOutputs

from .metrics import json_finite
from .parity_report import Layer, Localization
from .runners import onnx_runner

# Relative RMS error a tensor must exceed to count as a jump: well above the arithmetic noise of
# each precision, so rounding noise is not blamed on a layer.
JUMP_FLOOR = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}
JUMP_RATIO = 10.0
TOP_N = 5
LAYER_FIGURES = ("rel_err", "prev_max_rel_err", "jump_ratio")


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.sqrt(np.mean((out - ref) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-12))


def scope_to_module(node_name: str) -> str | None:
    """TorchScript export scope -> torch module name; the last path element is the op itself."""
    parts = node_name.strip("/").split("/")[:-1]
    names: list[str] = []
    for p in parts:
        if names and p.startswith(names[-1] + "."):  # "body", "body.0": child 0 of body
            names[-1] = p
        else:
            names.append(p)
    return ".".join(names) or None


def _weight_names(model: onnx.ModelProto, node: onnx.NodeProto) -> list[str]:
    """Initializers feeding the node, looking through Q/DQ and Cast nodes (int8/fp16 graphs)."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for name in node.input:
        for _ in range(3):
            if name in inits:
                found.append(name)
                break
            prod = producers.get(name)
            if prod is None or prod.op_type not in ("DequantizeLinear", "QuantizeLinear", "Cast", "Identity"):
                break
            name = prod.input[0]
    return found


def _run_marked(model: onnx.ModelProto, feed: dict, name: str) -> dict[str, np.ndarray]:
    marked = ModifyOutputs(model, outputs=constants.MARK_ALL, copy=True)()
    with onnx_runner(marked.SerializeToString(), name=name) as runner:
        outs = runner.infer(feed, check_inputs=False)
        return {k: np.array(v) for k, v in outs.items()}


def _float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def _compare_onnx(model: onnx.ModelProto, outs: dict, ref_outs: dict) -> list[dict]:
    rows = []
    for node in model.graph.node:
        for t in node.output:
            if t in outs and t in ref_outs and _float(outs[t]) and outs[t].shape == ref_outs[t].shape:
                rows.append({"node": node.name or t, "op": node.op_type, "tensor": t,
                             "rel_err": rel_error(outs[t], ref_outs[t]), "_node": node})
                break
    return rows


def _torch_leaf_map(model: onnx.ModelProto, torch_model: torch.nn.Module) -> "OrderedDict[str, onnx.NodeProto]":
    """Leaf module name -> the last ONNX node exported in its scope (that node's output is the module's)."""
    leaves = {n for n, m in torch_model.named_modules() if n and not list(m.children())}
    mapping: OrderedDict[str, onnx.NodeProto] = OrderedDict()
    for node in model.graph.node:
        mod = scope_to_module(node.name) if node.name.startswith("/") else None
        if mod in leaves:
            mapping[mod] = node
    return mapping


def _compare_torch(model: onnx.ModelProto, outs: dict, torch_model: torch.nn.Module, feed: dict) -> list[dict]:
    mapping = _torch_leaf_map(model, torch_model)
    captured: dict[str, np.ndarray] = {}
    modules = dict(torch_model.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().float().numpy()))
        for name in mapping]
    try:
        with torch.inference_mode():
            torch_model(torch.from_numpy(np.ascontiguousarray(next(iter(feed.values())))).float())
    finally:
        for h in hooks:
            h.remove()
    node_module = {id(node): name for name, node in mapping.items()}
    rows = []
    for node in model.graph.node:
        name = node_module.get(id(node))
        if name is None or name not in captured or node.output[0] not in outs:
            continue
        out = outs[node.output[0]]
        if out.shape != captured[name].shape:
            continue
        rows.append({"node": node.name, "op": node.op_type, "tensor": node.output[0], "module": name,
                     "rel_err": rel_error(out, captured[name]), "_node": node})
    return rows


def _shares_topology(model: onnx.ModelProto, other: onnx.ModelProto) -> bool:
    mine = {o for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose") for o in n.output}
    theirs = {o for n in other.graph.node for o in n.output}
    return bool(mine) and len(mine & theirs) >= 0.5 * len(mine)


def localize(path: Path | str, precision: str, feed: dict, *, torch_model: torch.nn.Module,
             ref_onnx: list[Path] | None = None) -> Localization:
    """Compare every intermediate tensor of the ONNX at `path` with a reference on one input."""
    model = onnx.load(str(path))
    outs = _run_marked(model, feed, "localize-artifact")
    ref_path = None
    for cand in ref_onnx or []:
        other = onnx.load(str(cand))
        if _shares_topology(model, other):
            ref_path, ref_model = cand, other
            break
    if ref_path is not None:
        rows = _compare_onnx(model, outs, _run_marked(ref_model, feed, "localize-reference"))
        method, reference = "onnx-reference", str(ref_path)
    else:
        rows = _compare_torch(model, outs, torch_model, feed)
        method, reference = "torch-hooks", "fp32 torch reference (forward hooks)"
    floor = JUMP_FLOOR.get(precision, JUMP_FLOOR["fp32"])
    worst_before, first, best_ratio, best = 0.0, None, 0.0, None
    for row in rows:
        ratio = row["rel_err"] / max(worst_before, floor / JUMP_RATIO)
        row["prev_max_rel_err"] = worst_before
        row["jump_ratio"] = ratio
        if first is None and row["rel_err"] > floor and ratio >= JUMP_RATIO:
            first = row
        if ratio > best_ratio:
            best_ratio, best = ratio, row
        worst_before = max(worst_before, row["rel_err"])

    def public(row: dict | None) -> Layer | None:
        if row is None:
            return None
        module = row.get("module") or (scope_to_module(row["node"]) if row["node"].startswith("/") else None)
        return Layer(row["node"], row["op"], row["tensor"], *(json_finite(row[k]) for k in LAYER_FIGURES), module,
                     _weight_names(model, row["_node"]))

    culprit = first or best
    if not rows:
        note = ("no intermediate tensor could be matched to the reference (node names do not follow the "
                "TorchScript exporter's module scopes and no passing fp32 ONNX shares its tensor names)")
    elif first:
        note = f"first tensor whose relative error exceeds {floor:g} and jumps {JUMP_RATIO:g}x over everything before it"
    else:
        note = f"no tensor jumps {JUMP_RATIO:g}x above {floor:g}; the largest relative increase is named"
    top = sorted(rows, key=lambda r: -r["jump_ratio"])[:TOP_N]
    return Localization(method, reference, len(rows), floor, JUMP_RATIO, public(culprit), first is not None, note,
                        [public(r) for r in top])
