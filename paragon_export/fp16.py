"""FP16 ONNX from a verified FP32 graph: onnxconverter-common, fp32 I/O by default, overflow-aware.

Which nodes stay fp32 is measured, not guessed: the fp32 graph runs on calibration photos and
every node whose activations exceed FP16_SAFE_ABS (or that reads such a tensor, or holds weights
beyond the fp16 range) is kept fp32. If the fp16 graph then misses FP16_TARGET_PSNR on the
calibration photos, the node whose fp16 rounding adds the most relative error is kept fp32 too,
one at a time. Verification (on held-out photos) compares against the fp32 ONNX and against torch
half-precision arithmetic of the fused model: ORT CPU upcasts fp16 ops internally, so its figure
alone understates what an fp16 GPU kernel does.

API: write_fp16(fp32_graph, tmp_path, *, reference, fp32_path, ...) -> (metadata, info), used by
`export_onnx(..., fp16=True)`; `fp16_block_list(...)` for the node analysis alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .errors import ParagonError
from .images import lr_hr_crops, sample_photo_paths
from .onnx_graph import OUTPUT_NAME, name_nodes, op_counts, ort_session, set_metadata

FP16_MAX = 65504.0
# 16x headroom below the fp16 maximum for images brighter or busier than the calibration set.
FP16_SAFE_ABS = FP16_MAX / 16
FP16_TARGET_PSNR = 60.0
MAX_ERROR_BLOCKS = 8
CALIB_LR_SIZE = (64, 64)
CALIB_IMAGES = 8


def calibration_inputs(scale: int, paths=None, size=CALIB_LR_SIZE) -> list[np.ndarray]:
    """NCHW LR crops of real photos (by default the bundled training photos, not the held-out ones
    verification uses)."""
    paths = list(paths or sample_photo_paths("train"))[:CALIB_IMAGES]
    return [lr.transpose(2, 0, 1)[None].copy() for _, lr, _ in lr_hr_crops(paths, scale, size)]


def _threads() -> int | None:
    from . import export_onnx

    return export_onnx.VERIFY_THREADS


def _convert(graph: onnx.ModelProto, blocked, keep_io_types: bool) -> onnx.ModelProto:
    from onnxconverter_common import float16

    g = copy.deepcopy(graph)
    # Stale value_info from the simplifier makes the converter emit Casts whose declared types
    # ORT then rejects; the converter re-infers what it needs.
    del g.graph.value_info[:]
    return float16.convert_float_to_float16(g, keep_io_types=keep_io_types, node_block_list=sorted(blocked),
                                            max_finite_val=FP16_MAX)


def _probe(model: onnx.ModelProto, names: list[str]):
    """A session that also returns the named intermediate tensors (typed by shape inference)."""
    p = copy.deepcopy(model)
    inferred = onnx.shape_inference.infer_shapes(p)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    existing = {o.name for o in p.graph.output}
    added = [n for n in names if n not in existing and types.get(n) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    for n in added:
        p.graph.output.append(helper.make_tensor_value_info(n, types[n], None))
    sess = ort_session(p, threads=_threads())
    return sess, [o.name for o in sess.get_outputs()]


def _activation_names(graph: onnx.ModelProto) -> list[str]:
    return [o for n in graph.graph.node for o in n.output if o and o != OUTPUT_NAME]


def _run_probe(sess, out_names, x: np.ndarray) -> dict[str, np.ndarray]:
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    vals = sess.run(None, {inp.name: x.astype(dtype)})
    return {n: v.astype(np.float32) for n, v in zip(out_names, vals)}


def _overflow_blocks(graph: onnx.ModelProto, calib: list[np.ndarray]) -> tuple[dict, dict]:
    """Nodes to keep fp32 because their activations (outputs or inputs) or weights leave the safe
    fp16 range. Returns (blocked {node: reason}, peak |activation| per tensor)."""
    names = _activation_names(graph)
    sess, out_names = _probe(graph, names)
    peak: dict[str, float] = {}
    for x in calib:
        for n, v in _run_probe(sess, out_names, x).items():
            peak[n] = max(peak.get(n, 0.0), float(np.abs(v).max()) if np.isfinite(v).all() else float("inf"))
    weights = {t.name: float(np.abs(numpy_helper.to_array(t)).max(initial=0.0)) for t in graph.graph.initializer
               if t.data_type == TensorProto.FLOAT}
    blocked = {}
    for node in graph.graph.node:
        big_out = [o for o in node.output if peak.get(o, 0.0) > FP16_SAFE_ABS]
        big_in = [i for i in node.input if peak.get(i, 0.0) > FP16_SAFE_ABS]
        big_w = [i for i in node.input if weights.get(i, 0.0) > FP16_MAX]
        if big_out:
            blocked[node.name] = f"activation peak {peak[big_out[0]]:.4g} > {FP16_SAFE_ABS:.4g}"
        elif big_in:
            blocked[node.name] = f"reads activation with peak {peak[big_in[0]]:.4g} > {FP16_SAFE_ABS:.4g}"
        elif big_w:
            blocked[node.name] = f"weight magnitude {weights[big_w[0]]:.4g} > fp16 max"
    return blocked, peak


def _error_stats(graph: onnx.ModelProto, converted: onnx.ModelProto, calib: list[np.ndarray]) -> tuple[float, dict]:
    """(PSNR of the fp16 output vs fp32 on the calibration photos, relative RMS error per tensor)."""
    names = _activation_names(graph)
    s32, n32 = _probe(graph, names)
    s16, n16 = _probe(converted, names)
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
    out_psnr = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
    rel = {n: float(np.sqrt(err[n] / ref[n])) if ref[n] > 0 else 0.0 for n in err}
    return out_psnr, rel


def fp16_block_list(graph: onnx.ModelProto, calib: list[np.ndarray], *,
                    target_psnr: float = FP16_TARGET_PSNR) -> tuple[dict, dict]:
    """Decide which nodes stay fp32. Returns (blocked {node name: reason}, figures)."""
    name_nodes(graph)
    blocked, peak = _overflow_blocks(graph, calib)
    figures: dict = {"activation_peak": max(peak.values(), default=0.0), "calibration_images": len(calib)}
    producers = {o: n for n in graph.graph.node for o in n.output}
    for _ in range(MAX_ERROR_BLOCKS + 1):
        out_psnr, rel = _error_stats(graph, _convert(graph, blocked, True), calib)
        figures["calibration_psnr"] = out_psnr
        if out_psnr >= target_psnr:
            break
        # The error a node adds = its output's relative error minus the worst of its inputs'.
        added = {}
        for node in graph.graph.node:
            if node.name in blocked or not node.output or node.output[0] not in rel:
                continue
            inherited = max((rel.get(i, 0.0) for i in node.input if i in producers or i == "input"), default=0.0)
            added[node.name] = rel[node.output[0]] - inherited
        if not added:
            break
        worst = max(added, key=added.get)
        blocked[worst] = f"fp16 error dominates (+{added[worst]:.2e} relative RMS at {out_psnr:.1f} dB)"
    return blocked, figures


def write_fp16(graph32: onnx.ModelProto, tmp: Path, *, reference: torch.nn.Module, fp32_path: Path,
               keep_io_types: bool = True, static_shape=None, verify_sizes=None, calib_paths=None,
               target_psnr: float = FP16_TARGET_PSNR) -> tuple[dict, dict]:
    """Convert the verified fp32 graph, verify it, write it to `tmp`. Returns (metadata, info)."""
    from .export_onnx import VERIFY_SIZES, compare, describe, run_onnx, run_torch, verification_inputs

    meta = {p.key: p.value for p in graph32.metadata_props}
    scale = int(meta["scale"])
    calib_size = tuple(static_shape) if static_shape is not None else CALIB_LR_SIZE
    calib = calibration_inputs(scale, calib_paths, calib_size)
    graph = copy.deepcopy(graph32)
    blocked, figures = fp16_block_list(graph, calib, target_psnr=target_psnr)
    g16 = _convert(graph, blocked, keep_io_types)
    meta.update(precision="fp16", io_dtype="float32" if keep_io_types else "float16",
                fp16_fp32_nodes=json.dumps(sorted(blocked)))
    set_metadata(g16, meta)
    try:
        onnx.checker.check_model(g16, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ParagonError(f"FP16 graph fails the ONNX checker: {str(e).splitlines()[0]}") from None
    onnx.save(g16, str(tmp))

    sizes = [tuple(static_shape)] if static_shape is not None else list(verify_sizes or VERIFY_SIZES)
    inputs = verification_inputs(scale, sizes)
    out16, err16 = run_onnx(ort_session(tmp, threads=_threads()), inputs)
    if err16:
        raise ParagonError(f"FP16 ONNX does not run on ORT CPU: {next(iter(err16.values()))}; nothing written")
    out32, _ = run_onnx(ort_session(fp32_path, threads=_threads()), inputs)
    half_model = copy.deepcopy(reference).half().eval()
    try:
        half = {(g, n): run_torch(half_model, x, torch.float16) for g, n, x in inputs}
        torch32 = {(g, n): run_torch(reference, x) for g, n, x in inputs}
        half_note = None
    except RuntimeError as e:  # an op without a CPU half kernel in this torch build
        half, torch32, half_note = None, None, f"torch CPU half arithmetic unavailable: {str(e).splitlines()[0]}"
    report = {"vs_fp32_onnx": compare(out16, out32), "target_psnr": target_psnr, "torch_half_note": half_note}
    if half is not None:
        report["vs_torch_half"] = compare(out16, half)
        # What all-fp16 arithmetic does to the model (no node kept fp32): the figure an fp16 GPU
        # engine approaches, which ORT CPU's upcasting hides.
        report["torch_half_vs_fp32"] = compare(half, torch32)
    report["ok"] = bool(report["vs_fp32_onnx"]["min_psnr"] >= target_psnr)
    if not report["ok"]:
        raise ParagonError(f"ONNX FP16 verification failed: PSNR vs FP32 ONNX {describe(report['vs_fp32_onnx'], 'psnr')} "
                           f"(target >= {target_psnr:g} dB; kept fp32: {len(blocked)} nodes); nothing written")
    info = {"fp16": {"kept_fp32": blocked, **figures}, "verification": report,
            "nodes_after": op_counts(g16)}
    return meta, info
