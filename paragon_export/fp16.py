"""FP16 ONNX from a verified FP32 graph: onnxconverter-common, fp32 I/O by default, overflow-aware.

ORT CPU cannot tell how an fp16 graph behaves on fp16 hardware: it runs fp16 nodes by casting to
fp32 and drops the casts between them, so activations are never stored in fp16 and nothing
overflows (an fp16 graph with 1.6e5 activations runs "fine" there). So the decisions and the
main check use an emulation instead: the fp32 graph with every fp16 node's weights and outputs
rounded through float16 (what an fp16 kernel that accumulates in fp32 and stores fp16 does).

Which nodes stay fp32 is measured, not guessed: the fp32 graph runs on calibration photos and
every node whose activations exceed FP16_SAFE_ABS (or that reads such a tensor, or holds weights
beyond the fp16 range) is kept fp32. If the emulated fp16 graph then misses FP16_TARGET_PSNR on
the calibration photos, the node whose fp16 rounding adds the most relative error is kept fp32
too, one at a time, while each gains >= MIN_BLOCK_GAIN_DB (at most MAX_ERROR_BLOCKS).

Verification (held-out photos) of the written file: ORT CPU fp16 file vs the fp32 ONNX, the
emulation of the same graph vs the fp32 ONNX, and torch `.half()` arithmetic of the fused model
(every node fp16) vs fp32 and vs the file. Pass: ORT CPU >= FP16_TARGET_PSNR, and the fp16
arithmetic figures (emulation; torch half when no node is kept fp32, since torch cannot keep
nodes fp32) >= FP16_ARITH_FLOOR_PSNR; arithmetic figures between the floor and the target are
reported as `below_target` (deep variants with large residual-stream activations land there: the
rounding error is spread over every layer, and keeping single nodes fp32 does not fix it).

API: write_fp16(fp32_graph, tmp_path, *, reference, fp32_path, ...) -> (metadata, info), used by
`export_onnx(..., fp16=True)`; fp16_block_list(graph, calib) and emulate_fp16(graph, kept) alone;
The torch half reference is `torch_half.torch_half_model`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .errors import ParagonError
from .images import sample_photo_paths
from .torch_half import torch_half_model
from .onnx_graph import INPUT_NAME, check_and_save, OUTPUT_NAME, name_nodes, op_counts, ort_session, set_metadata
from .records import Record, optional
from .verify import (VERIFY_SIZES, VERIFY_THREADS, Verification, compare_groups, run_onnx, run_torch, session_batch,
                     verification_inputs)

FP16_MAX = 65504.0
# 16x headroom below the fp16 maximum for images brighter or busier than the calibration set.
FP16_SAFE_ABS = FP16_MAX / 16
FP16_TARGET_PSNR = 60.0
MAX_ERROR_BLOCKS = 8
MIN_BLOCK_GAIN_DB = 0.5
# fp16 arithmetic (emulation; torch half) below the target is reported, below this floor it fails:
# 50 dB is an error RMS of 0.3% of the range, far beyond fp16's rounding, i.e. a broken conversion.
FP16_ARITH_FLOOR_PSNR = 50.0
CALIB_LR_SIZE = (64, 64)
CALIB_IMAGES = 8


def calibration_inputs(scale: int, paths=None, size=CALIB_LR_SIZE) -> list[np.ndarray]:
    """NCHW LR crops of real photos (by default the bundled training photos, not the held-out ones
    verification uses); photos smaller than `size` are padded as in verification."""
    paths = list(paths or sample_photo_paths("train"))[:CALIB_IMAGES]
    return [x for _, _, x in verification_inputs(scale, [tuple(size)], paths=paths, batch=1)]


# ---------------------------------------------------------------- conversion

def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _drop_cast_round_trips(model: onnx.ModelProto) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs the converter leaves where a tensor between two kept-fp32
    nodes has several consumers: they would round (and overflow) exactly the tensors kept fp32."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    drop = []
    for n in graph.node:
        src = producers.get(n.input[0]) if n.input else None
        if (_cast_to(n) == TensorProto.FLOAT and src is not None and _cast_to(src) == TensorProto.FLOAT16
                and n.output[0] not in outputs):
            rename[n.output[0]] = src.input[0]
            drop.append(n)
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    used = {i for n in graph.node for i in n.input} | outputs
    for n in [n for n in graph.node if _cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in used]:
        graph.node.remove(n)
    return len(drop)


def convert(graph: onnx.ModelProto, kept_fp32, keep_io_types: bool = True) -> onnx.ModelProto:
    """The fp16 graph: every node but `kept_fp32` (names) in float16."""
    from onnxconverter_common import float16

    g = copy.deepcopy(graph)
    # Stale value_info from the simplifier makes the converter emit Casts whose declared types
    # ORT then rejects; the converter re-infers what it needs.
    del g.graph.value_info[:]
    with warnings.catch_warnings():
        # It warns once per weight below fp16's smallest subnormal (clamped, harmless).
        warnings.simplefilter("ignore")
        g = float16.convert_float_to_float16(g, keep_io_types=keep_io_types, node_block_list=sorted(kept_fp32),
                                             max_finite_val=FP16_MAX)
    _drop_cast_round_trips(g)
    return g


def emulate_fp16(graph: onnx.ModelProto, kept_fp32) -> onnx.ModelProto:
    """An fp32 graph that rounds the input, every fp16 node's weights and every fp16 node's outputs
    through float16, as fp16 hardware stores them. Tensor names are those of `graph`."""
    g = copy.deepcopy(graph)
    del g.graph.value_info[:]
    kept = set(kept_fp32)
    fp16_users: set[str] = set()
    for n in g.graph.node:
        if n.name not in kept:
            fp16_users.update(n.input)
    for t in g.graph.initializer:
        if t.data_type == TensorProto.FLOAT and t.name in fp16_users:
            w = np.clip(numpy_helper.to_array(t), -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    nodes = []

    def rounding(src: str, dst: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Cast", [src], [dst + "__fp16"], to=TensorProto.FLOAT16, name=dst + "__to_fp16"),
                helper.make_node("Cast", [dst + "__fp16"], [dst], to=TensorProto.FLOAT, name=dst + "__to_fp32")]

    if any(n.name not in kept for n in g.graph.node if INPUT_NAME in n.input):
        nodes += rounding(INPUT_NAME, INPUT_NAME + "__rounded")
        for n in g.graph.node:
            if n.name not in kept:
                for i, name in enumerate(n.input):
                    if name == INPUT_NAME:
                        n.input[i] = INPUT_NAME + "__rounded"
    for n in g.graph.node:
        nodes.append(n)
        if n.name in kept:
            continue
        for i, out in enumerate(n.output):
            if out:
                n.output[i] = out + "__fp32"
                nodes += rounding(out + "__fp32", out)
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    return g


# ---------------------------------------------------------------- measuring

def _activation_names(graph: onnx.ModelProto) -> list[str]:
    return [o for n in graph.graph.node for o in n.output if o and o != OUTPUT_NAME]


def _probe(model: onnx.ModelProto, names: list[str]):
    """A session returning the output and the named (fp32) intermediate tensors."""
    import onnxruntime as ort

    p = copy.deepcopy(model)
    produced = {o for node in p.graph.node for o in node.output}
    for n in names:
        if n in produced:
            p.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    # No graph rewrites: the emulation's fp16 round trips must stay exactly where they are.
    sess = ort_session(p, threads=VERIFY_THREADS, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return sess, [o.name for o in sess.get_outputs()]


def _run_probe(sess, out_names, x: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(out_names, sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})))


def _peak(v: np.ndarray) -> float:
    return float(np.abs(v).max()) if np.isfinite(v).all() else float("inf")


def overflow_blocks(graph: onnx.ModelProto, calib: list[np.ndarray]) -> tuple[dict, dict]:
    """Nodes to keep fp32 because their activations (outputs or inputs) or weights leave the safe
    fp16 range. Returns (kept {node: reason}, peak |activation| per tensor)."""
    sess, out_names = _probe(graph, _activation_names(graph))
    peak: dict[str, float] = {}
    for x in calib:
        for n, v in _run_probe(sess, out_names, x).items():
            peak[n] = max(peak.get(n, 0.0), _peak(v))
    weights = {t.name: float(np.abs(numpy_helper.to_array(t)).max(initial=0.0)) for t in graph.graph.initializer
               if t.data_type == TensorProto.FLOAT}
    kept = {}
    for node in graph.graph.node:
        big_out = [o for o in node.output if peak.get(o, 0.0) > FP16_SAFE_ABS]
        big_in = [i for i in node.input if peak.get(i, 0.0) > FP16_SAFE_ABS]
        big_w = [i for i in node.input if weights.get(i, 0.0) > FP16_MAX]
        if big_out:
            kept[node.name] = f"activation peak {peak[big_out[0]]:.4g} > {FP16_SAFE_ABS:.4g}"
        elif big_in:
            kept[node.name] = f"reads an activation with peak {peak[big_in[0]]:.4g} > {FP16_SAFE_ABS:.4g}"
        elif big_w:
            kept[node.name] = f"weight magnitude {weights[big_w[0]]:.4g} > fp16 max"
    return kept, peak


def _error_stats(graph: onnx.ModelProto, kept, calib: list[np.ndarray]) -> tuple[float, dict]:
    """(PSNR of the emulated fp16 output vs fp32 on the calibration photos, relative RMS error per tensor)."""
    names = _activation_names(graph)
    s32, n32 = _probe(graph, names)
    s16, n16 = _probe(emulate_fp16(graph, kept), names)
    err: dict[str, float] = {}
    ref: dict[str, float] = {}
    mse, count = 0.0, 0
    for x in calib:
        a, b = _run_probe(s32, n32, x), _run_probe(s16, n16, x)
        for n in a.keys() & b.keys():
            err[n] = err.get(n, 0.0) + float(np.square(a[n].astype(np.float64) - b[n]).sum())
            ref[n] = ref.get(n, 0.0) + float(np.square(a[n].astype(np.float64)).sum())
        d = a[OUTPUT_NAME].astype(np.float64) - b[OUTPUT_NAME]
        mse, count = mse + float(np.square(d).sum()), count + d.size
    mse /= max(count, 1)
    out_psnr = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse)) if np.isfinite(mse) else float("-inf")
    rel = {n: float(np.sqrt(err[n] / ref[n])) if ref[n] > 0 else 0.0 for n in err}
    return out_psnr, rel


def fp16_block_list(graph: onnx.ModelProto, calib: list[np.ndarray], *,
                    target_psnr: float | None = None) -> tuple[dict, dict]:
    """Decide which nodes stay fp32. Returns (kept {node name: reason}, figures)."""
    target_psnr = FP16_TARGET_PSNR if target_psnr is None else target_psnr
    name_nodes(graph)
    kept, peak = overflow_blocks(graph, calib)
    figures: dict = {"activation_peak": max(peak.values(), default=0.0), "calibration_images": len(calib),
                     "error_blocking": None}
    producers = {o: n for n in graph.graph.node for o in n.output}
    out_psnr, rel = _error_stats(graph, kept, calib)
    for _ in range(MAX_ERROR_BLOCKS):
        if out_psnr >= target_psnr:
            break
        # The error a node adds = its output's relative error minus the worst of its inputs'.
        added = {}
        for node in graph.graph.node:
            if node.name in kept or not node.output or node.output[0] not in rel:
                continue
            inherited = max((rel.get(x, 0.0) for x in node.input if x in producers), default=0.0)
            added[node.name] = rel[node.output[0]] - inherited
        if not added:
            break
        worst = max(added, key=added.get)
        trial = {**kept, worst: f"fp16 error dominates (+{added[worst]:.2e} relative RMS at {out_psnr:.1f} dB)"}
        trial_psnr, trial_rel = _error_stats(graph, trial, calib)
        if not trial_psnr - out_psnr >= MIN_BLOCK_GAIN_DB:
            # The error is spread over many nodes: keeping more of them fp32 costs speed, not error.
            figures["error_blocking"] = (f"stopped: keeping {worst} in fp32 would gain "
                                         f"{trial_psnr - out_psnr:.2f} dB (< {MIN_BLOCK_GAIN_DB} dB)")
            break
        kept, out_psnr, rel = trial, trial_psnr, trial_rel
    figures["calibration_psnr"] = out_psnr
    return kept, figures


# ---------------------------------------------------------------- the step

def write_fp16(graph32: onnx.ModelProto, tmp: Path, *, reference: torch.nn.Module, fp32_path: Path,
               keep_io_types: bool = True, static_shape=None, verify_sizes=None, calib_paths=None,
               target_psnr: float | None = None) -> tuple[dict, dict]:
    """Convert the verified fp32 graph, verify it, write it to `tmp`. Returns (metadata, info)."""
    target_psnr = FP16_TARGET_PSNR if target_psnr is None else target_psnr
    meta = {p.key: p.value for p in graph32.metadata_props}
    scale = int(meta["scale"])
    calib = calibration_inputs(scale, calib_paths, tuple(static_shape) if static_shape else CALIB_LR_SIZE)
    graph = copy.deepcopy(graph32)
    kept, figures = fp16_block_list(graph, calib, target_psnr=target_psnr)
    g16 = convert(graph, kept, keep_io_types)
    meta.update(precision="fp16", io_dtype="float32" if keep_io_types else "float16",
                fp16_fp32_nodes=json.dumps(sorted(kept)))
    set_metadata(g16, meta)
    check_and_save(g16, tmp, "FP16 graph")

    sizes = [tuple(static_shape)] if static_shape is not None else list(verify_sizes or VERIFY_SIZES)
    report = _verify_fp16(tmp, fp32_path, emulate_fp16(graph, kept), reference, scale, sizes, kept, target_psnr)
    info = {"fp16": {"kept_fp32": kept, **figures}, "verification": report.to_json(), "nodes_after": op_counts(g16)}
    return meta, info


@dataclass
class Fp16Verification(Record):
    """The written fp16 file on the verification photos: ORT CPU vs the fp32 ONNX (held to the target),
    the fp16-storage emulation and torch .half() arithmetic vs fp32 (held to the floor; figures between
    the floor and the target are shipped and listed in `below_target`)."""

    vs_fp32_onnx: Verification
    emulated_vs_fp32: Verification
    target_psnr: float
    torch_half_note: str | None = None
    vs_torch_half: Verification | None = optional()
    torch_half_vs_fp32: Verification | None = optional()
    ok: bool = False
    arith_floor_psnr: float = FP16_ARITH_FLOOR_PSNR
    below_target: list[str] = field(default_factory=list)

    def line(self) -> str:
        """What the onnx command prints about it."""
        out = (f"verified fp16 (min PSNR vs fp32, target >= {self.target_psnr:g} dB): ORT CPU "
               f"{self.vs_fp32_onnx.min_psnr:.1f} dB, fp16-storage emulation {self.emulated_vs_fp32.min_psnr:.1f} dB")
        if self.vs_torch_half is not None:
            out += (f", torch half {self.torch_half_vs_fp32.min_psnr:.1f} dB "
                    f"(file vs torch half {self.vs_torch_half.min_psnr:.1f} dB)")
        return out + (f"; {self.torch_half_note}" if self.torch_half_note else "")


def _verify_fp16(path16: Path, fp32_path: Path, emulated: onnx.ModelProto, reference: torch.nn.Module, scale: int,
                 sizes, kept: dict, target_psnr: float) -> Fp16Verification:
    """Run the written file, the fp32 ONNX, the emulation and torch half on the same photos; judge them."""
    sess16 = ort_session(path16, threads=VERIFY_THREADS)
    inputs = verification_inputs(scale, sizes, batch=session_batch(sess16))
    out16, err16 = run_onnx(sess16, inputs)
    if err16:
        raise ParagonError(f"FP16 ONNX does not run on ORT CPU: {next(iter(err16.values()))}; nothing written")
    out32, _ = run_onnx(ort_session(fp32_path, threads=VERIFY_THREADS), inputs)
    sess_emu, names_emu = _probe(emulated, [])
    emu_out = {(g, n): _run_probe(sess_emu, names_emu, x)[OUTPUT_NAME] for g, n, x in inputs}
    v = Fp16Verification(compare_groups(out16, out32), compare_groups(emu_out, out32), target_psnr)
    try:
        half_model = torch_half_model(reference)
        half = {(g, n): run_torch(half_model, x, torch.float16) for g, n, x in inputs}
        torch32 = {(g, n): run_torch(reference, x) for g, n, x in inputs}
        v.vs_torch_half, v.torch_half_vs_fp32 = compare_groups(out16, half), compare_groups(half, torch32)
        if kept:
            v.torch_half_note = f"torch half runs every node in fp16; this file keeps {len(kept)} in fp32"
    except RuntimeError as e:  # an op without a CPU half kernel in this torch build
        v.torch_half_note = f"torch CPU half arithmetic unavailable: {str(e).splitlines()[0]}"
    arith = [("fp16-storage emulation vs fp32", v.emulated_vs_fp32)]
    if not kept and v.torch_half_vs_fp32 is not None:
        arith.append(("torch half vs fp32", v.torch_half_vs_fp32))
    checks = [("ORT fp16 vs fp32 ONNX", v.vs_fp32_onnx, target_psnr)]
    checks += [(label, r, FP16_ARITH_FLOOR_PSNR) for label, r in arith]
    failed = [(label, r, limit) for label, r, limit in checks if not r.min_psnr >= limit]
    v.ok = not failed
    # Below the target but above the floor: shipped, and said so (CLI, Artifact meta).
    v.below_target = [f"{label} {r.min_psnr:.1f} dB" for label, r in arith if not r.min_psnr >= target_psnr]
    if failed:
        figures_text = "; ".join(f"{label} (limit {limit:g} dB): {r.describe('psnr')}" for label, r, limit in failed)
        raise ParagonError(f"ONNX FP16 verification failed (PSNR): {figures_text} "
                           f"(kept fp32: {len(kept)} nodes); nothing written")
    return v
