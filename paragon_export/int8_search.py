"""int8_search: the TensorRT quantization recipe and the accuracy-driven mixed-precision search.

The INT8 model is measured against FP32 on the held-out images; while it misses the target, nodes are
kept in float one at a time, in order of PSNR bought back per share of the model's MACs (leave-one-out
on calibration crops, so the held-out images only judge), up to a budget; a node that does not help
on held-out goes back to int8. After each node kept, only the leaders of the last ranking and the kept
node's graph neighbours are re-measured: that is where the order changes, and it keeps the search
linear in the number of nodes."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from paragon_export.calibration.ranges import Ranges

from .int8_bias import bias_deltas, corrected, input_channel_means, undo_map
from .int8_check import WEIGHTED_OPS, inspect_qdq, mac_shares, quiet_quantizer, trt_int8_exclusions
from .int8_eval import Evaluator, Quality
from .int8_remainder import Remainder

DEFAULT_BUDGET_FRACTION = 0.40  # of the quantizable nodes, when no node budget is given
RERANK_LEADERS = 8  # candidates from the top of the last ranking re-measured after each node kept
COST_FLOOR = 0.02  # added to every node's MAC share in the ranking
MAX_REJECTED = 8  # nodes tried beyond the budget (ones that did not help go back to int8)
TRT_OPS = list(WEIGHTED_OPS)
TRT_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,  # TensorRT has no int32 DequantizeLinear: biases stay float
    "AddQDQPairToWeight": True,  # float weight -> Q -> DQ, the form TensorRT folds into its int8 kernels
    "OpTypesToExcludeOutputQuantization": TRT_OPS,  # Q/DQ on conv inputs only; TensorRT fuses the rest
    "QDQOpTypePerChannelSupportToAxis": dict(WEIGHTED_OPS),
    "DedicatedQDQPair": False,
}
def quantize_symmetric(fp32: Path, out: Path, ranges: Ranges, exclude: list[str] = ()) -> None:
    """The TensorRT recipe, reading activation ranges from the calibration cache (no inference)."""
    with quiet_quantizer():
        quantize_static(str(fp32), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=TRT_OPS,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), calibrate_method=ranges.ort_method,
                        extra_options=dict(TRT_EXTRA_OPTIONS), calibration_cache_path=str(ranges.cache_path))



def _meets(q: Quality, target_psnr: float | None, max_drop: float | None) -> bool:
    m = q.mean
    return ((target_psnr is None or m.psnr_vs_fp32 >= target_psnr)
            and (max_drop is None or m.y_psnr_drop <= max_drop))


def _step(kept: list[str], q: Quality, added: str | None) -> dict:
    m = q.mean
    return {"kept_float": list(kept), "added": added, "psnr_vs_fp32": m.psnr_vs_fp32,
            "y_psnr": m.y_psnr, "ssim": m.ssim, "y_psnr_drop": m.y_psnr_drop}


def float_behind_qdq(producer: dict[str, onnx.NodeProto], tensor: str) -> str | None:
    """The float tensor a Q->DQ pair quantizes, if `tensor` is that pair's output; else None."""
    dq = producer.get(tensor)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def keep_float(model: onnx.ModelProto, nodes: list[str],
               undo: dict[str, tuple[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """A copy of a Q/DQ model with `nodes` reading the float tensors behind their Q->DQ inputs, and
    Q/DQ nodes nobody reads any more removed: what `nodes_to_exclude` produces, without requantizing.
    `undo`: node -> (bias initializer, uncorrected value), put back for nodes leaving int8."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    wanted = set(nodes)
    inits = {i.name: i for i in g.initializer}
    for node in wanted & set(undo or {}):
        name, value = undo[node]
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    for n in g.node:
        if n.name not in wanted:
            continue
        for i, t in enumerate(n.input):
            if (src := float_behind_qdq(producer, t)) is not None:
                n.input[i] = src
    while True:
        used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {t for n in g.node for t in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return m


def rank_nodes(base: onnx.ModelProto, ev: Evaluator, candidates: list[str], kept: list[str],
               shares: dict[str, float], progress: Callable[[str], None],
               undo: dict[str, tuple[str, np.ndarray]] | None = None) -> list[dict]:
    """Leave-one-out given the nodes already in float: the PSNR (against fp32, on calibration crops)
    each candidate buys back when kept in float too. Ordered by gain per share of the model's MACs
    it would move to float (floored, so a near-free node still needs a real gain): an HR-resolution
    conv is most of an SR model's work and is kept in float only if nothing cheaper helps."""
    base_score = ev.rank_score(keep_float(base, kept, undo).SerializeToString())
    out = []
    for i, node in enumerate(candidates):
        gain = ev.rank_score(keep_float(base, [*kept, node], undo).SerializeToString()) - base_score
        share = shares.get(node, 0.0)
        out.append({"node": node, "psnr_gain": gain, "mac_share": share, "score": gain / (share + COST_FLOOR)})
        if (i + 1) % 25 == 0:
            progress(f"  ranked {i + 1}/{len(candidates)} nodes")
    return sorted(out, key=lambda r: -r["score"])


def rerank(base: onnx.ModelProto, ev: Evaluator, ranking: list[dict], near: set[str], kept: list[str],
           shares: dict[str, float], progress: Callable[[str], None],
           undo: dict[str, tuple[str, np.ndarray]] | None = None) -> list[dict]:
    """The ranking after a node was kept in float. Gains change most for the leaders and for the kept
    node's neighbours (the second pass of a separable filter looks harmless until the first is float),
    so those are measured again and go first; the rest keep their order behind them."""
    fresh = [r["node"] for i, r in enumerate(ranking) if i < RERANK_LEADERS or r["node"] in near]
    stale = [r for r in ranking if r["node"] not in fresh]
    return rank_nodes(base, ev, fresh, kept, shares, progress, undo) + stale


def neighbours(model: onnx.ModelProto, node: str) -> set[str]:
    """Weighted nodes that feed `node` or read its output with only unweighted ops in between."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    producer = {o: n for n in model.graph.node for o in n.output}
    start = next(n for n in model.graph.node if n.name == node)
    found: set[str] = set()
    for step in (lambda n: [c for o in n.output for c in consumers.get(o, [])],
                 lambda n: [producer[t] for t in n.input if t in producer]):
        todo, seen = step(start), set()
        while todo:
            n = todo.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.op_type in WEIGHTED_OPS:
                found.add(n.name)
            else:
                todo.extend(step(n))
    return found


def computed_weights(model: onnx.ModelProto) -> list[str]:
    """Weighted nodes whose weight is computed in the graph rather than stored: ORT can only quantize
    those per tensor, which TensorRT rejects, so they stay in float (an export without constant
    folding leaves e.g. the legacy Magic upsampler's taps like that)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.input[1] not in inits]


class _Quantizer:
    """Requantizes the FP32 model with a list of nodes left in float (biases corrected for the int8
    weights' mean error, except those nodes') and measures the result as shipped."""

    def __init__(self, fp32: Path, ranges: Ranges, ev: Evaluator, tmp: Path, remainder: Remainder):
        self.fp32, self.ranges, self.ev, self.tmp, self.remainder = fp32, ranges, ev, tmp, remainder
        self.path = tmp / "step.onnx"
        self.proto = onnx.load(str(fp32))
        self.deltas: dict[str, np.ndarray] = {}

    def quantize(self, exclude: list[str]) -> None:
        src = self.fp32
        if self.deltas:
            src = self.tmp / "fp32_bias_corrected.onnx"
            onnx.save(corrected(self.proto, self.deltas, exclude), str(src))
        quantize_symmetric(src, self.path, self.ranges, exclude)

    def measure(self) -> Quality:
        return self.ev.quality(self.remainder.apply(onnx.load(str(self.path))).SerializeToString())


def mixed_precision(fp32: Path, ranges: Ranges, ev: Evaluator, tmp: Path, *, target_psnr: float | None,
                    max_drop: float | None, node_budget: int | None, bias_correction: bool,
                    remainder: Remainder, progress: Callable[[str], None]) -> dict:
    """Quantize, measure on held-out, and keep the costliest nodes in float until the target holds.
    `steps` lists every node tried, with the held-out figures and whether it stayed in float.
    Held-out figures are of the model as shipped (float remainder in `remainder`'s dtype); the
    ranking, only an order, runs on the fp32 remainder."""
    qz = _Quantizer(fp32, ranges, ev, tmp, remainder)
    # Convs TensorRT has no int8 kernel for start (and stay) in float: int8 there buys no speed.
    excluded = trt_int8_exclusions(qz.proto)
    computed = computed_weights(qz.proto)
    fixed = [*computed, *(n for n in excluded if n not in computed)]
    shares = mac_shares(qz.proto)
    qz.quantize(fixed)
    plain = onnx.load(str(qz.path))
    candidates = inspect_qdq(plain)["quantized_nodes"]
    correction = {"enabled": bias_correction}
    if bias_correction:
        correction["without"] = _step([], qz.measure(), None)
        qz.deltas = bias_deltas(plain, input_channel_means(qz.proto, ev.calib, candidates))
        correction["nodes"] = len(qz.deltas)
        qz.quantize(fixed)
    budget = node_budget if node_budget is not None else math.ceil(DEFAULT_BUDGET_FRACTION * len(candidates))
    q = qz.measure()
    t0 = time.perf_counter()
    q, kept, steps, first = _keep_until_met(qz, q, fixed, candidates, shares, budget, target_psnr, max_drop, progress)
    return {"target_psnr": target_psnr, "max_drop": max_drop, "node_budget": budget,
            "quantizable_nodes": len(candidates), "float_fixed": fixed, "trt_excluded": excluded,
            "bias_correction": correction,
            "met": _meets(q, target_psnr, max_drop), "kept_float": kept,
            "float_mac_share": sum(shares.get(n, 0.0) for n in [*fixed, *kept]),
            "steps": steps, "ranking": first[:max(budget, 10)], "seconds": round(time.perf_counter() - t0, 2),
            "model": qz.path.read_bytes(), "quality": q}


def _keep_until_met(qz: _Quantizer, q: Quality, fixed: list[str], candidates: list[str], shares: dict[str, float], budget: int,
                    target_psnr: float | None, max_drop: float | None,
                    progress: Callable[[str], None]) -> tuple[Quality, list[str], list[dict], list[dict]]:
    """The search loop from the model `qz` last wrote (held-out figures `q`). Returns (held-out figures,
    nodes kept in float, every step, the first ranking); `qz.path` holds the best model."""
    undo = undo_map(qz.proto, qz.deltas)
    kept: list[str] = []
    steps = [_step(kept, q, None)]
    if _meets(q, target_psnr, max_drop) or budget <= 0:
        return q, kept, steps, []
    progress(f"int8 misses the target ({_describe(q)}); ranking {len(candidates)} nodes (leave-one-out)")
    quantized = onnx.load(str(qz.path))
    ranking = first = rank_nodes(quantized, qz.ev, candidates, kept, shares, progress, undo)
    best = qz.path.read_bytes()
    tried: set[str] = set()
    while len(kept) < budget and len(tried) < budget + MAX_REJECTED:
        todo = [r for r in ranking if r["node"] not in tried]
        if not todo:
            break
        node = todo[0]["node"]
        tried.add(node)
        qz.quantize([*fixed, *kept, node])
        trial = qz.measure()
        # A node that does not raise the held-out PSNR goes back to int8 rather than costing speed.
        better = trial.mean.psnr_vs_fp32 > q.mean.psnr_vs_fp32
        steps.append(_step([*kept, node], trial, node) | {"kept": better})
        progress(f"  float: {node}  -> {_describe(trial)}{'' if better else '  (no gain: back to int8)'}")
        if better:
            kept.append(node)
            q, best = trial, qz.path.read_bytes()
            if _meets(q, target_psnr, max_drop) or len(kept) == budget:
                break
            ranking = rerank(quantized, qz.ev, [r for r in todo if r["node"] != node],
                             neighbours(qz.proto, node), kept, shares, progress, undo)
    qz.path.write_bytes(best)
    return q, kept, steps, first


def _describe(q: Quality) -> str:
    m = q.mean
    s = f"PSNR vs fp32 {m.psnr_vs_fp32:.2f} dB"
    if m.y_psnr_drop is not None:
        s += f", Y-PSNR drop {m.y_psnr_drop:+.3f} dB"
    return s

