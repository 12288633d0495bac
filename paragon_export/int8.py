"""int8: FP32 ONNX + calibration images -> TensorRT-compatible Q/DQ INT8 ONNX, proven on held-out photos.

Recipe (what TensorRT explicit quantization needs, SPEC §5): ONNX Runtime `quantize_static` in QDQ
format, int8 symmetric activations and weights (zero point 0), per-channel weights on the
output-channel axis, float biases, Q/DQ on the inputs of Conv/ConvTranspose only (TensorRT fuses
the rest; residual adds and the output stay in float). Ranges come from `calibration.ranges`
(cached; entropy is the real KL search). Biases are corrected for the int8 weights' mean error
(`int8_bias`).

Convs TensorRT has no int8 kernel for (ModelOpt's small-channel rules, `int8_check.trt_int8_exclusions`)
are never quantized. The rest of the float part runs fp16 by default (`int8_remainder`).

Accuracy-driven mixed precision: the INT8 model is measured against FP32 on the held-out images; while
it misses the target, nodes are kept in float one at a time, in order of PSNR bought back per share
of the model's MACs (leave-one-out on calibration crops, so the held-out images only judge), up to a
budget; a node that does not help on held-out goes back to int8. After each node kept, only the
leaders of the last ranking and the kept node's graph neighbours are re-measured: that is where the
order changes, and it keeps the search linear in the number of nodes.

The original deploy script's recipe (asymmetric QUInt8 activations, per-tensor weights, entropy
through `quantize_static`, no exclusions) runs on the same model and data for comparison."""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from paragon_export.calibration import CalibrationSet, build_calibration_set
from paragon_export.calibration.ranges import Ranges, calibration_ranges

from .artifact import Artifact, atomic_output, check_output, sha256_file
from .errors import ParagonError, require_file
from .int8_bias import bias_deltas, corrected, input_channel_means, undo_map
from .int8_check import WEIGHTED_OPS, brief, inspect_qdq, mac_shares, quiet_quantizer, trt_blockers, trt_int8_exclusions
from .int8_compare import comparisons
from .int8_cache import load_search, search_cache_base, store_search
from .int8_eval import RANK_CROPS, Evaluator, latency, native_vs_reference, run, session
from .int8_recipe import Int8Recipe
from .int8_remainder import FP16_QDQ_OPSET, Remainder, dtype_mac_shares, plan_remainder
from .onnx_graph import graph_precision, set_metadata

DEFAULT_BUDGET_FRACTION = 0.40  # of the quantizable nodes, when no node budget is given
RERANK_LEADERS = 8  # candidates from the top of the last ranking re-measured after each node kept
COST_FLOOR = 0.02  # added to every node's MAC share in the ranking
MAX_REJECTED = 8  # nodes tried beyond the budget (ones that did not help go back to int8)
MIN_OPSET = 13
CALIB_PROBES = 8  # calibration batches the fp16 overflow guard measures activation peaks on
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


# ---------------------------------------------------------------- input model

def _load_fp32(path: Path) -> onnx.ModelProto:
    require_file(path, "model")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf decode errors have no common base class
        raise ParagonError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0] if str(e) else e}") from None
    g = model.graph
    if len(g.input) != 1 or len(g.input[0].type.tensor_type.shape.dim) != 4:
        raise ParagonError(f"{path}: expected one NCHW image input, found {len(g.input)} inputs")
    if g.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ParagonError(f"{path}: input is not float32 (give the FP32 ONNX, not an FP16 or INT8 one)")
    precision = graph_precision(model)
    if precision != "fp32":  # an fp16 file has fp32 I/O (keep_io_types): the graph says what it is
        raise ParagonError(f"{path} is {'already quantized' if precision == 'int8' else 'an ' + precision + ' model'}: "
                           "give the FP32 ONNX")
    channels = g.input[0].type.tensor_type.shape.dim[1]
    if channels.HasField("dim_value") and channels.dim_value != 3:
        raise ParagonError(f"{path}: expected an RGB image input (N x 3 x H x W), found {channels.dim_value} channels")
    return model


def _prepare(model: onnx.ModelProto, tmp: Path, src: Path) -> Path:
    """Node names (the mixed-precision loop excludes nodes by name) and opset >= 13, in a copy if needed."""
    changed = False
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
            changed = True
        seen.add(n.name)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, MIN_OPSET)
        changed = True
    if not changed:
        return src
    out = tmp / "fp32_prepared.onnx"
    onnx.save(model, str(out))
    return out


def _static_dims(model: onnx.ModelProto) -> tuple[int | None, tuple[int, int] | None]:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    batch = dims[0]
    hw = (dims[2], dims[3]) if dims[2] and dims[3] else None
    return batch, hw


def _infer_scale(fp32: Path, hw: tuple[int, int] | None) -> int:
    h, w = hw or (16, 20)
    try:
        y = run(session(fp32), np.zeros((1, 3, h, w), np.float32))
    except ParagonError:
        raise
    except Exception as e:  # ORT's own failure types: the model does not take a 1x3xHxW image
        raise ParagonError(f"{fp32}: a 1x3x{h}x{w} image does not run through it "
                           f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]})") from None
    if y.ndim != 4 or y.shape[1] != 3:
        raise ParagonError(f"{fp32}: a 1x3x{h}x{w} image gives an output of shape {list(y.shape)}, not an image")
    sh, sw = y.shape[2] / h, y.shape[3] / w
    if sh != sw or sh != int(sh) or sh < 1:
        raise ParagonError(f"cannot infer the upscale factor: {h}x{w} in, {y.shape[2]}x{y.shape[3]} out")
    return int(sh)


def _from_checkpoint(ckpt: Path, tmp: Path, variant: str | None, scale: int | None) -> Path:
    try:
        from .export_onnx import export_onnx
    except ImportError:
        raise ParagonError(f"{ckpt} is a checkpoint; export it with `paragon-export onnx` first "
                           "and pass the .onnx") from None
    arts = export_onnx(ckpt, tmp, variant=variant, scale=scale, force=True)
    return Path(arts["fp32"].path)


# ---------------------------------------------------------------- mixed precision

def _meets(q: dict, target_psnr: float | None, max_drop: float | None) -> bool:
    m = q["mean"]
    return ((target_psnr is None or m["psnr_vs_fp32"] >= target_psnr)
            and (max_drop is None or m["y_psnr_drop"] <= max_drop))


def _step(kept: list[str], q: dict, added: str | None) -> dict:
    m = q["mean"]
    return {"kept_float": list(kept), "added": added, "psnr_vs_fp32": m["psnr_vs_fp32"],
            "y_psnr": m.get("y_psnr"), "ssim": m.get("ssim"), "y_psnr_drop": m.get("y_psnr_drop")}


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
            dq = producer.get(t)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[i] = q.input[0]
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


def mixed_precision(fp32: Path, ranges: Ranges, ev: Evaluator, tmp: Path, *, target_psnr: float | None,
                    max_drop: float | None, node_budget: int | None, bias_correction: bool,
                    remainder: Remainder, progress: Callable[[str], None]) -> dict:
    """Quantize, measure on held-out, and keep the costliest nodes in float until the target holds.
    `steps` lists every node tried, with the held-out figures and whether it stayed in float.
    Held-out figures are of the model as shipped (float remainder in `remainder`'s dtype); the
    ranking, only an order, runs on the fp32 remainder."""
    path = tmp / "step.onnx"

    def measure(p: Path) -> dict:
        return ev.quality(remainder.apply(onnx.load(str(p))).SerializeToString())

    fp32_proto = onnx.load(str(fp32))
    # Convs TensorRT has no int8 kernel for start (and stay) in float: int8 there buys no speed.
    excluded = trt_int8_exclusions(fp32_proto)
    computed = computed_weights(fp32_proto)
    fixed = [*computed, *(n for n in excluded if n not in computed)]
    shares = mac_shares(fp32_proto)
    quantize_symmetric(fp32, path, ranges, fixed)
    plain = onnx.load(str(path))
    candidates = inspect_qdq(plain)["quantized_nodes"]
    deltas: dict[str, np.ndarray] = {}
    correction = {"enabled": bias_correction}
    if bias_correction:
        correction["without"] = _step([], measure(path), None)
        deltas = bias_deltas(plain, input_channel_means(fp32_proto, ev.calib, candidates))
        correction["nodes"] = len(deltas)
    undo = undo_map(fp32_proto, deltas)

    def quantize(exclude: list[str]) -> None:
        src = fp32
        if deltas:
            src = tmp / "fp32_bias_corrected.onnx"
            onnx.save(corrected(fp32_proto, deltas, exclude), str(src))
        quantize_symmetric(src, path, ranges, exclude)

    quantize(fixed)
    budget = node_budget if node_budget is not None else math.ceil(DEFAULT_BUDGET_FRACTION * len(candidates))
    q = measure(path)
    kept: list[str] = []
    steps = [_step(kept, q, None)]
    first: list[dict] = []
    t0 = time.perf_counter()
    if not _meets(q, target_psnr, max_drop) and budget > 0:
        progress(f"int8 misses the target ({_describe(q)}); ranking {len(candidates)} nodes (leave-one-out)")
        quantized = onnx.load(str(path))
        ranking = first = rank_nodes(quantized, ev, candidates, kept, shares, progress, undo)
        best = path.read_bytes()
        tried: set[str] = set()
        while len(kept) < budget and len(tried) < budget + MAX_REJECTED:
            todo = [r for r in ranking if r["node"] not in tried]
            if not todo:
                break
            node = todo[0]["node"]
            tried.add(node)
            quantize([*fixed, *kept, node])
            trial = measure(path)
            # A node that does not raise the held-out PSNR goes back to int8 rather than costing speed.
            better = trial["mean"]["psnr_vs_fp32"] > q["mean"]["psnr_vs_fp32"]
            steps.append(_step([*kept, node], trial, node) | {"kept": better})
            progress(f"  float: {node}  -> {_describe(trial)}{'' if better else '  (no gain: back to int8)'}")
            if better:
                kept.append(node)
                q, best = trial, path.read_bytes()
                if _meets(q, target_psnr, max_drop) or len(kept) == budget:
                    break
                ranking = rerank(quantized, ev, [r for r in todo if r["node"] != node],
                                 neighbours(fp32_proto, node), kept, shares, progress, undo)
        path.write_bytes(best)
    return {"target_psnr": target_psnr, "max_drop": max_drop, "node_budget": budget,
            "quantizable_nodes": len(candidates), "float_fixed": fixed, "trt_excluded": excluded,
            "bias_correction": correction,
            "met": _meets(q, target_psnr, max_drop), "kept_float": kept,
            "float_mac_share": sum(shares.get(n, 0.0) for n in [*fixed, *kept]),
            "steps": steps, "ranking": first[:max(budget, 10)], "seconds": round(time.perf_counter() - t0, 2),
            "model": path.read_bytes(), "quality": q}


def _describe(q: dict) -> str:
    m = q["mean"]
    s = f"PSNR vs fp32 {m['psnr_vs_fp32']:.2f} dB"
    if "y_psnr_drop" in m:
        s += f", Y-PSNR drop {m['y_psnr_drop']:+.3f} dB"
    return s


# ---------------------------------------------------------------- the step

def output_paths(out_dir: Path, stem: str, opset: int | None = None) -> tuple[Path, Path]:
    """`{variant}_x{s}_fp32_op{N}` -> `{variant}_x{s}_int8_op{N}.onnx` (+ `_report.json`), the export's
    naming, with the written file's opset when it differs; any other stem gets `_int8` appended."""
    base = stem.replace("_fp32", "_int8") if "_fp32" in stem else f"{stem}_int8"
    if opset is not None:
        base = re.sub(r"_op\d+$", f"_op{opset}", base)
    return out_dir / f"{base}.onnx", out_dir / f"{base}_report.json"


def quantize_int8(model: Path | str, out_dir: Path | str, recipe: Int8Recipe | None = None, *,
                  calib_dir: Path | str | None = None, calib: CalibrationSet | None = None,
                  cache_dir: Path | str | None = None, peer: bool = True, threads: int = 1,
                  variant: str | None = None, scale: int | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> Artifact:
    """MODEL (.onnx FP32, or a checkpoint) -> `{out_dir}/<variant>_x<s>_int8_op<N>.onnx` + `..._report.json`,
    made as `recipe` says (default `Int8Recipe()`); `calib` replaces the set the recipe would build.

    Returns the model's Artifact; its meta is the report (also written as JSON)."""
    progress = progress or (lambda _msg: None)
    r = (recipe or Int8Recipe()).check()
    method = r.method
    src = Path(model)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="paragon-int8-") as tmp_name:
        tmp = Path(tmp_name)
        if src.suffix.lower() == ".onnx":
            fp32_src = src
        else:
            progress(f"exporting {src} to FP32 ONNX")
            fp32_src = _from_checkpoint(src, tmp, variant, scale)
        model_path, report_path = output_paths(out_dir, fp32_src.stem,
                                               FP16_QDQ_OPSET if r.remainder == "fp16" else None)
        check_output(model_path, force=force)
        check_output(report_path, force=force)
        proto = _load_fp32(fp32_src)
        fp32 = _prepare(proto, tmp, fp32_src)
        batch, static_hw = _static_dims(proto)
        found = _infer_scale(fp32, static_hw)
        if scale is not None and scale != found:
            raise ParagonError(f"--scale {scale} does not match the model (x{found})")
        if calib is None:
            calib = build_calibration_set(calib_dir, scale=found, lr_size=static_hw or r.lr_size,
                                          crops_per_image=r.crops_per_image, batch_size=batch or r.batch_size,
                                          seed=r.seed, holdout=r.holdout, eval_size=static_hw or r.eval_size)
        elif calib.params["scale"] != found:
            raise ParagonError(f"calibration set is for x{calib.params['scale']}, the model is x{found}")
        if not calib.holdout:
            raise ParagonError("the calibration set has no held-out images to evaluate on")
        if r.max_drop is not None and not all(h.hr is not None for h in calib.holdout):
            raise ParagonError("held-out images have no HR ground truth: use --target-psnr instead of --max-drop")
        for s in calib.skipped:
            progress(f"warning: skipped {s}")

        progress(f"calibrating ({method}) on {len(calib.crops)} crops from {len(calib.calib_images)} images")
        ranges = calibration_ranges(fp32, calib, method, cache_dir=cache_dir, op_types=TRT_OPS, inputs_only=True)
        progress(f"calibration ranges: cache {'hit (no inference run)' if ranges.hit else 'miss'} ({ranges.cache_path})")
        ev = Evaluator(fp32, calib, found, threads, static_batch=batch is not None)
        prepared = onnx.load(str(fp32))
        rest = plan_remainder(r.remainder, prepared, [calib.batch(i) for i in range(min(len(calib), CALIB_PROBES))])
        search = r.search_options()
        base = search_cache_base(ranges.cache_path, {**search, "remainder": rest.summary(), "rank_crops": RANK_CROPS,
                                                     "static_batch": batch is not None})
        mp = load_search(base)
        if mp is not None:
            progress(f"mixed-precision search: cache hit ({base}.json); measuring the cached model")
            mp["quality"] = ev.quality(rest.apply(onnx.load_from_string(mp["model"])).SerializeToString())
            mp["search_cache"] = "hit"
        else:
            mp = mixed_precision(fp32, ranges, ev, tmp, **search, remainder=rest, progress=progress)
            store_search(base, mp)
            mp["search_cache"] = "miss"
        int8_quality = mp.pop("quality")
        int8_proto = rest.apply(onnx.load_from_string(mp.pop("model")))
        mp["mac_share"] = dtype_mac_shares(int8_proto, mac_shares(prepared))
        mp["remainder"] = rest.summary()
        # Downstream steps (engine, parity) read the precision from metadata and cross-check the graph.
        set_metadata(int8_proto, {"precision": "int8", "quantization": "qdq int8 symmetric, per-channel weights",
                                  "remainder": r.remainder, "calibration_method": method,
                                  "calibration_fingerprint": calib.fingerprint,
                                  "float_nodes": ",".join(mp["float_fixed"] + mp["kept_float"]),
                                  "fp32_nodes": ",".join(sorted(rest.kept_fp32)),
                                  "int8_mac_share": f"{mp['mac_share']['int8']:.4f}",
                                  "fp32_sha256": sha256_file(fp32)})
        int8_bytes = int8_proto.SerializeToString()
        checks = inspect_qdq(int8_proto)
        blockers = trt_blockers(checks)
        if blockers:
            raise ParagonError(f"the INT8 model is not TensorRT-compatible: {'; '.join(blockers)}")
        (tmp / "int8.onnx").write_bytes(int8_bytes)
        models = {"fp32": fp32, "int8": tmp / "int8.onnx"}
        native = native_vs_reference(tmp / "int8.onnx", [h.lr for h in calib.holdout], threads)

        rows: dict = {}
        if peer:
            rows, more = comparisons(fp32, calib, tmp, ev, mac_shares(prepared), cache_dir, progress)
            models.update(more)
        progress("timing on ONNX Runtime CPU")
        lat = latency(models, calib.holdout[0].lr, threads=threads)
        ms = lat["median_ms"]
        lat["ratio_vs_fp32"] = {k: ms[k] / ms["fp32"] for k in ms}

        report = {
            "model": {"source": str(src), "fp32_onnx": str(fp32_src), "fp32_sha256": sha256_file(fp32), "scale": found},
            "calibration": {**calib.summary(), **ranges.summary()},
            "recipe": {"format": "QDQ", "activations": "int8 symmetric (zero point 0)",
                       "weights": "int8 symmetric, per-channel (Conv axis 0, ConvTranspose axis 1)",
                       "bias": "float" + (", corrected for the int8 weights' mean error" if r.bias_correction else ""),
                       "quantized_ops": TRT_OPS, "output_quantization": False,
                       "method": method, "trt_compatible": True, "options": r.as_dict()},
            "checks": brief(checks),
            "mixed_precision": mp,
            "quality": {"fp32": ev.fp32, "int8": int8_quality},
            "latency": lat,
            "native_kernels": native,
            "peer": rows.get("peer"),
            "modelopt": rows.get("modelopt"),
        }
        with atomic_output(model_path, force=force) as t:
            t.write_bytes(int8_bytes)
        report["output"] = {"model": str(model_path), "sha256": sha256_file(model_path), "report": str(report_path)}
        with atomic_output(report_path, force=force) as t:
            t.write_text(json.dumps(report, indent=2, default=_json_default))
    return Artifact(model_path, "onnx-int8", report)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
