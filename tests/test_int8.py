"""int8: TensorRT-compatible Q/DQ INT8 from a real FP32 ONNX export of seeded ParagonSR2 models,
calibrated and judged on real photos with real ONNX Runtime sessions."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from paragon_export.calibration import build_calibration_set
from paragon_export.calibration.entropy import entropy_threshold
from paragon_export.calibration.ranges import calibration_ranges
from conftest import make_model
from paragon_export.cli import main
from paragon_export.errors import ParagonError
from paragon_export.int8 import quantize_int8
from paragon_export.int8_search import RERANK_LEADERS, TRT_OPS, keep_float, neighbours, quantize_symmetric, rerank
from paragon_export.int8_eval import run, session
from paragon_export.int8_recipe import Int8Recipe
from paragon_export.int8_report import Int8Report, RemainderSummary
from paragon_export.metrics import psnr

SENSITIVE = "/body/body.0/blocks/blocks.1/transformer/project_out/Conv"
def infer(model, x):
    """`model` on ORT CPU with Q/DQ reference semantics (the int8 evaluation's own runner)."""
    with session(model) as s:
        return run(s, x)


SMALL = {"lr_size": (24, 24), "crops_per_image": 2, "batch_size": 4, "eval_size": (32, 32)}


def export_fp32(model: torch.nn.Module, path):
    """FP32 ONNX with dynamic batch/H/W, as `paragon-export onnx` makes it (TorchScript exporter + onnxsim)."""
    import onnxsim

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 20, 28),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}, "output": {0: "b", 2: "oh", 3: "ow"}})
    simplified, ok = onnxsim.simplify(onnx.load_from_string(buf.getvalue()))
    assert ok
    onnx.save(simplified, str(path))
    return path


def seeded_fused(seed: int = 0):
    torch.manual_seed(seed)  # make_model seeds gammas and kernels; conv weights come from torch's global RNG
    return make_model(fused=True, seed=seed)


def sensitive_model():
    """Nano whose one project_out has an ill-conditioned weight: hidden channels 0 and 1 are made
    identical and project_out gets +A*v / -A*v on them (cancels exactly in float), so its per-channel
    int8 scale is set by A and every other weight of the layer rounds to zero."""
    m = seeded_fused(0)
    t = m.body[0].blocks[1].transformer
    with torch.no_grad():
        t.project_in.weight[1] = t.project_in.weight[0]
        t.project_in.bias[1] = t.project_in.bias[0]
        t.dwconv.weight[1] = t.dwconv.weight[0]
        t.project_out.weight *= 10  # make the block matter
        t.project_out.bias *= 10
        v = torch.randn(t.project_out.weight.shape[0], generator=torch.Generator().manual_seed(1))
        a = 1000 * t.project_out.weight.abs().max()
        t.project_out.weight[:, 0, 0, 0] += a * v
        t.project_out.weight[:, 1, 0, 0] -= a * v
    return m


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return export_fp32(seeded_fused(0), tmp_path_factory.mktemp("onnx") / "nano_x2_fp32.onnx")


@pytest.fixture(scope="module")
def calib():
    return build_calibration_set(None, scale=2, **SMALL)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def default_run(fp32, calib, cache_dir, tmp_path_factory):
    return quantize_int8(fp32, tmp_path_factory.mktemp("out"), calib=calib, cache_dir=cache_dir)


def _init(model, name):
    for i in model.graph.initializer:
        if i.name == name:
            return i
    return None


def test_default_int8_is_symmetric_per_channel_qdq(default_run, fp32, calib):
    model = onnx.load(str(default_run.path))
    opset = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")][0]
    assert opset >= 13
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:  # every zero point is an int8 zero
        zp = _init(model, n.input[2])
        assert zp is not None and zp.data_type == onnx.TensorProto.INT8, n.name
        assert not numpy_helper.to_array(zp).any(), n.name
    producer = {o: n for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    mp = default_run.mixed_precision
    kept = set(mp.kept_float) | set(mp.float_fixed)
    assert set(mp.trt_excluded) <= set(mp.float_fixed)
    for n in weighted:
        dq = producer.get(n.input[1])
        if n.name in kept:
            assert dq is None
            continue
        q = producer[dq.input[0]]
        w = numpy_helper.to_array(_init(model, q.input[0]))
        scale = numpy_helper.to_array(_init(model, dq.input[1]))
        axis = {a.name: a.i for a in dq.attribute}["axis"]
        want = 0 if n.op_type == "Conv" else 1
        assert axis == want and scale.shape == (w.shape[want],), n.name  # per output channel
        assert producer[n.input[0]].op_type == "DequantizeLinear"  # activation quantized too
        if len(n.input) > 2:
            # bias stays float (fp16 remainder), never an int32 DequantizeLinear TensorRT cannot take
            assert _init(model, n.input[2]).data_type == onnx.TensorProto.FLOAT16
    # The file runs and stays close to fp32 on a held-out photo.
    ref = infer(fp32, calib.holdout[0].lr)
    out = infer(default_run.path, calib.holdout[0].lr)
    assert psnr(np.clip(out, 0, 1), np.clip(ref, 0, 1)) > 30


def test_remainder_is_fp16_with_fp32_io_and_shares_add_up(default_run, fp32, calib, cache_dir, tmp_path):
    model = onnx.load(str(default_run.path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]
    io = [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]
    assert io == [onnx.TensorProto.FLOAT] * 2
    mp = default_run.mixed_precision
    sh = mp.mac_share
    assert abs(sum(sh.values()) - 1) < 1e-6 and sh["fp32"] == 0 and sh["int8"] > 0
    assert sh["fp16"] == pytest.approx(mp.float_mac_share)  # the float nodes are the fp16 ones
    assert mp.remainder == RemainderSummary(dtype="fp16", kept_fp32={})
    # The same search with an fp32 remainder: same int8 set, no fp16 anywhere, and fp16 costs little.
    art = quantize_int8(fp32, tmp_path, Int8Recipe(remainder="fp32"), calib=calib, cache_dir=cache_dir, peer=False)
    m32 = onnx.load(str(art.path))
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in m32.graph.initializer)
    assert art.mixed_precision.mac_share["fp16"] == 0
    assert art.path.name.endswith("_op17.onnx") == (fp32.stem.endswith("_op17"))
    x = calib.holdout[0].lr
    a, b = infer(default_run.path, x), infer(art.path, x)
    assert psnr(np.clip(a, 0, 1), np.clip(b, 0, 1)) > 40
    with pytest.raises(ParagonError, match="remainder"):
        quantize_int8(fp32, tmp_path / "bad", Int8Recipe(remainder="bf16"), calib=calib, cache_dir=cache_dir)


def test_search_outcome_is_cached_and_replayed_identically(default_run, fp32, calib, cache_dir, tmp_path):
    assert default_run.mixed_precision.search_cache == "miss" and default_run.mixed_precision.model_sha256 is None
    again = quantize_int8(fp32, tmp_path, calib=calib, cache_dir=cache_dir, peer=False)
    assert again.mixed_precision.search_cache == "hit" and again.mixed_precision.model_sha256
    assert again.path.read_bytes() == default_run.path.read_bytes()
    assert again.quality.int8 == default_run.quality.int8
    # the replay's report is the search's own, field for field, but for the cache's bookkeeping
    assert again.mixed_precision == dataclasses.replace(default_run.mixed_precision, search_cache="hit",
                                                        model_sha256=again.mixed_precision.model_sha256)
    # another option is another search
    other = quantize_int8(fp32, tmp_path / "b", Int8Recipe(max_drop=0.5), calib=calib, cache_dir=cache_dir, peer=False)
    assert other.mixed_precision.search_cache == "miss"


def test_trt_exclusions_follow_modelopt_small_channel_rules(fp32):
    from paragon_export.int8_check import trt_int8_exclusions

    ex = trt_int8_exclusions(onnx.load(str(fp32)))
    # nano: 24 features, 36 hidden, 3-channel band convs, 18-channel 3x3 depthwise (identity folded in)
    assert "/body/body.0/blocks/blocks.0/context/dwconv_w/Conv" in ex  # depthwise 1x9: a kernel dim < 3
    assert "/body/body.0/blocks/blocks.0/transformer/dwconv/Conv" in ex  # depthwise, 36 channels not 8-aligned
    assert "/magic_upsampler/Conv" in ex  # depthwise 1x7
    assert "/conv_in/Conv" not in ex  # 3->24 reads the graph input, 24 is 8-aligned, square kernel
    assert "/conv_out/Conv" not in ex  # 24->3, 24 is 8-aligned and >= 16
    assert "/upsampler/Conv" not in ex and "/magic_upsampler/ConvTranspose" not in ex
    assert not any("project_in" in n or "project_out" in n for n in ex)


def test_overflowing_activations_stay_fp32_with_their_qdq():
    from onnx import helper

    from paragon_export.int8_remainder import Remainder

    x = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    inits = [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["big", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("Mul", ["input", "input"], ["big"], name="square"),
             helper.make_node("Conv", ["dq", "w"], ["output"], name="conv")]
    nodes = [nodes[2], nodes[0], nodes[1], nodes[3]]
    g = helper.make_model(helper.make_graph(nodes, "t", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    rest = Remainder("fp16", {"square": "activation peak 1e5"}, {"big"})
    out = rest.apply(g)
    onnx.checker.check_model(out, full_check=True)
    by = {n.name: n for n in out.graph.node}
    inits16 = {i.name for i in out.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert "w" in inits16  # the conv runs fp16
    # the Q node reading the out-of-range tensor keeps its fp32 scale, so nothing overflows before it
    assert by["q"].input[1] == "s" and "s" not in inits16


def test_report_figures(default_run):
    r = default_run
    model = onnx.load(str(default_run.path))
    ops = [n.op_type for n in model.graph.node]
    assert r.checks.q_nodes == ops.count("QuantizeLinear") and r.checks.dq_nodes == ops.count("DequantizeLinear")
    assert r.checks.zero_points_all_zero and r.checks.weights_per_channel
    assert r.recipe["trt_compatible"] is True
    for q in (r.quality.fp32, r.quality.int8):
        assert np.isfinite(q.mean.y_psnr) and 0 < q.mean.ssim <= 1
        assert len(q.images) == len(r.calibration["holdout_images"]) == 4
    assert r.quality.int8.mean.y_psnr_drop == pytest.approx(r.quality.fp32.mean.y_psnr - r.quality.int8.mean.y_psnr)
    assert r.quality.fp32.mean.y_psnr_drop is None  # the drop is against fp32
    lat = r.latency
    assert set(lat.median_ms) == {"fp32", "int8", "peer", "modelopt"} and lat.ratio_vs_fp32["fp32"] == 1.0
    peer = r.peer
    assert peer.trt_compatible is False and peer.skipped is None
    assert any("zero points" in b for b in peer.trt_blockers)
    assert any("per-channel" in b for b in peer.trt_blockers)
    assert 20 < peer.quality.mean.psnr_vs_fp32 < 80
    mo = r.modelopt  # ModelOpt's own ONNX PTQ: TensorRT-compatible, fp16 remainder, our exclusions
    assert mo.trt_compatible is True and mo.remainder == "fp16"
    assert set(mo.excluded_nodes) == set(r.mixed_precision.trt_excluded)
    assert abs(sum(mo.mac_share.values()) - 1) < 1e-6 and mo.mac_share["fp32"] == 0
    assert r.mixed_precision.steps[0].kept_float == []


def test_written_report_json_is_the_typed_reports_json(default_run):
    """The file keeps the schema it always had; the typed report reads it back unchanged."""
    saved = default_run.path.with_name("nano_x2_int8_report.json")
    assert default_run.report_path == saved
    doc = json.loads(saved.read_text())
    assert list(doc) == ["model", "calibration", "recipe", "checks", "mixed_precision", "quality", "latency",
                         "native_kernels", "peer", "modelopt", "output"]
    assert list(doc["model"]) == ["source", "fp32_onnx", "fp32_sha256", "scale"]
    assert list(doc["output"]) == ["model", "sha256", "report"]
    assert list(doc["quality"]) == ["fp32", "int8"] and list(doc["quality"]["int8"]) == ["mean", "images"]
    assert list(doc["quality"]["int8"]["mean"]) == ["psnr_vs_fp32", "y_psnr", "ssim", "y_psnr_drop"]
    assert list(doc["latency"]) == ["threads", "input", "repeats", "median_ms", "ratio_vs_fp32"]
    assert list(doc["checks"])[-1] == "quantized_nodes" and isinstance(doc["checks"]["quantized_nodes"], int)
    mp = doc["mixed_precision"]
    assert list(mp)[-3:] == ["search_cache", "mac_share", "remainder"] and "model_sha256" not in mp
    assert list(mp["bias_correction"]) == ["enabled", "without", "nodes"]
    assert "kept" not in mp["steps"][0] and set(mp["steps"][0]) == {
        "kept_float", "added", "psnr_vs_fp32", "y_psnr", "ssim", "y_psnr_drop"}
    assert {"skipped", "excluded_nodes"}.isdisjoint(doc["peer"]) and "excluded_nodes" in doc["modelopt"]
    assert json.loads(json.dumps(default_run.to_json(), default=lambda o: o.item())) == doc
    back = Int8Report.from_json(doc)
    assert json.dumps(back.to_json()) == json.dumps(doc)  # key order too
    assert (back.quality, back.checks, back.mixed_precision) == (default_run.quality, default_run.checks,
                                                                 default_run.mixed_precision)
    assert back.table() == default_run.table()


def test_report_without_comparisons_reads_back(default_run):
    doc = json.loads(default_run.report_path.read_text())
    skipped = {**doc, "peer": None, "modelopt": {"skipped": "modelopt is not installed"}}
    r = Int8Report.from_json(skipped)
    assert r.peer is None and r.modelopt.skipped == "modelopt is not installed"
    assert r.to_json() == skipped
    table = r.table()
    assert "modelopt row skipped: modelopt is not installed" in table
    assert "ModelOpt ONNX PTQ" not in table and "original: QUInt8" not in table
    assert "ModelOpt ONNX PTQ" in default_run.table()


def test_calibration_cache_reuse_skips_collection(fp32, calib, tmp_path):
    first = calibration_ranges(fp32, calib, "minmax", cache_dir=tmp_path, op_types=TRT_OPS, inputs_only=True)
    assert not first.hit and first.batches == len(calib)
    served = calib.served
    again = calibration_ranges(fp32, calib, "minmax", cache_dir=tmp_path, op_types=TRT_OPS, inputs_only=True)
    assert again.hit and again.batches == 0 and calib.served == served  # no batch was read
    assert again.cache_path == first.cache_path
    # quantization reads the cache without any data reader
    quantize_symmetric(fp32, tmp_path / "q.onnx", again)
    assert (tmp_path / "q.onnx").is_file() and calib.served == served
    # a different calibration set or method is a different key
    other = build_calibration_set(None, scale=2, seed=5, **SMALL)
    assert not calibration_ranges(fp32, other, "minmax", cache_dir=tmp_path, op_types=TRT_OPS, inputs_only=True).hit
    assert not calibration_ranges(fp32, calib, "percentile", cache_dir=tmp_path, op_types=TRT_OPS,
                                  inputs_only=True).hit


def test_entropy_is_a_real_kl_search(fp32, tmp_path):
    import contextlib

    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    calib = build_calibration_set(None, scale=2, **(SMALL | {"crops_per_image": 1}))

    def ranges(method):
        r = calibration_ranges(fp32, calib, method, cache_dir=tmp_path, op_types=TRT_OPS, inputs_only=True)
        from onnxruntime.quantization.calibrate import load_tensors_data
        return {k: v.range_value for k, v in load_tensors_data(r.cache_path).items()}

    mm, ent = ranges("minmax"), ranges("entropy")
    assert mm.keys() == ent.keys()
    narrower = [k for k in mm if float(ent[k][1]) < float(mm[k][1]) - 1e-6 or float(ent[k][0]) > float(mm[k][0]) + 1e-6]
    assert len(narrower) >= len(mm) // 4  # KL clipping trims the tails of many tensors

    # ORT's quantize_static default (128 bins, 128 quantized bins) leaves one window: MinMax (SPEC §5).
    with contextlib.redirect_stdout(io.StringIO()):
        cal = create_calibrator(fp32, TRT_OPS, augmented_model_path=str(tmp_path / "aug.onnx"),
                                calibrate_method=CalibrationMethod.Entropy)
        calib.rewind()
        cal.collect_data(calib)
        default = {k: v.range_value for k, v in cal.compute_data().items()}
    assert all(np.isclose(float(default[k][1]), float(mm[k][1])) for k in mm)

    # The vectorised KL search picks exactly ORT's own threshold on real 2048-bin histograms.
    with contextlib.redirect_stdout(io.StringIO()):
        cal = create_calibrator(fp32, TRT_OPS, augmented_model_path=str(tmp_path / "aug2.onnx"),
                                calibrate_method=CalibrationMethod.Entropy,
                                extra_options={"num_bins": 2048, "num_quantized_bins": 128})
        calib.set_range(0, 2)
        cal.collect_data(calib)
        calib.set_range(0, len(calib))
    hists = cal.collector.histogram_dict
    for name in list(hists)[:2]:
        ours = entropy_threshold(*hists[name][:4], 128)
        theirs = cal.collector.get_entropy_threshold(hists[name], 128)
        assert float(ours[0]) == float(theirs[0]) and float(ours[1]) == float(theirs[1]), name


def test_mixed_precision_keeps_the_sensitive_layer_in_float(tmp_path, calib, cache_dir):
    fp32 = export_fp32(sensitive_model(), tmp_path / "sens_x2_fp32.onnx")
    art = quantize_int8(fp32, tmp_path / "out", Int8Recipe(target_psnr=80.0, max_drop=None, node_budget=1),
                        calib=calib, cache_dir=cache_dir, peer=False)
    mp = art.mixed_precision
    assert mp.ranking[0]["node"] == SENSITIVE
    assert mp.kept_float == [SENSITIVE] and not mp.met
    before, after = mp.steps[0].psnr_vs_fp32, mp.steps[1].psnr_vs_fp32
    assert after > before + 3.0, (before, after)
    assert SENSITIVE in art.checks.float_nodes

    # The ranking's shortcut (rewiring the Q/DQ graph) is the model nodes_to_exclude produces.
    ranges = calibration_ranges(fp32, calib, "percentile", cache_dir=cache_dir, op_types=TRT_OPS, inputs_only=True)
    quantize_symmetric(fp32, tmp_path / "all.onnx", ranges)
    quantize_symmetric(fp32, tmp_path / "excl.onnx", ranges, [SENSITIVE])
    shortcut = keep_float(onnx.load(str(tmp_path / "all.onnx")), [SENSITIVE]).SerializeToString()
    x = calib.batch(0)
    np.testing.assert_allclose(infer(shortcut, x), infer(tmp_path / "excl.onnx", x), atol=1e-5)


def test_polygraphy_comparator_consumes_the_set(default_run, fp32, calib):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    runners = [OnnxrtRunner(SessionFromOnnx(str(fp32)), name="fp32"),
               OnnxrtRunner(SessionFromOnnx(str(default_run.path)), name="int8")]
    results = Comparator.run(runners, data_loader=calib)
    assert all(len(iters) == len(calib) for _, iters in results)
    ok = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=0.25, rtol=0.0))
    assert bool(ok)


def test_cli_writes_table_refuses_overwrite_and_reuses_cache(fp32, cache_dir, tmp_path):
    out = tmp_path / "cli"
    args = ["int8", str(fp32), "-o", str(out), "--crop", "24x24", "--crops-per-image", "2", "--batch-size", "4",
            "--eval-size", "32x32",
            "--cache-dir", str(cache_dir), "--no-peer"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "int8 symmetric (percentile)" in r.output and "TensorRT" in r.output
    assert "cache hit" in r.output  # same model, images and method as the default run above
    assert (out / "nano_x2_int8.onnx").is_file() and (out / "nano_x2_int8_report.json").is_file()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output


def test_cli_bad_inputs_are_one_line_errors(fp32, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["int8", str(fp32), "-o", str(tmp_path / "o"), "--calib", str(empty)])
    assert r.exit_code == 1 and r.output.startswith("Error: calibration folder") and "holds no images" in r.output
    assert len(r.output.strip().splitlines()) == 1
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ParagonError, match="not a readable ONNX model"):
        quantize_int8(junk, tmp_path / "o")
    with pytest.raises(ParagonError, match="unknown calibration method"):
        quantize_int8(fp32, tmp_path / "o", Int8Recipe(method="kl"))


def test_foreign_and_fp16_onnx_are_one_line_errors(fp32, tmp_path):
    from onnx import helper

    from paragon_export.fp16 import convert

    fp16 = tmp_path / "nano_fp16.onnx"  # our own fp16 file: fp32 I/O, fp16 inside
    onnx.save(convert(onnx.load(str(fp32)), [], keep_io_types=True), str(fp16))
    gray = tmp_path / "gray.onnx"  # a 1-channel model
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(gray))
    clf = tmp_path / "classifier.onnx"  # image in, class scores out
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, 1, 1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(clf))
    for path, what in ((fp16, "an fp16 model"), (gray, "found 1 channels"), (clf, "upscale factor")):
        r = CliRunner().invoke(main, ["int8", str(path), "-o", str(tmp_path / "o"), "--no-peer"])
        assert r.exit_code == 1 and what in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_checkpoint_input_is_exported_first(nano_fused_ckpt, calib, cache_dir, tmp_path):
    art = quantize_int8(nano_fused_ckpt, tmp_path / "o", calib=calib, cache_dir=cache_dir, peer=False)
    assert art.path.name == "paragonsr2_nano_x2_int8_op19.onnx"  # fp16 Q/DQ scales need opset 19
    meta = {p.key: p.value for p in onnx.load(str(art.path)).metadata_props}
    assert meta["precision"] == "int8" and meta["variant"] == "paragonsr2_nano" and meta["scale"] == "2"
    assert art.checks.zero_points_all_zero and art.checks.weights_per_channel
    with pytest.raises(ParagonError, match="scale"):
        quantize_int8(nano_fused_ckpt, tmp_path / "o2", calib=calib, cache_dir=cache_dir, scale=3)


def test_neighbours_cross_unweighted_ops_only(fp32):
    model = onnx.load(str(fp32))
    # the two passes of the separable Magic filter, and the ConvTranspose that feeds them
    assert neighbours(model, "/magic_upsampler/Conv") == {"/magic_upsampler/ConvTranspose", "/magic_upsampler/Conv_1"}
    # through the LeakyRelu back to the depthwise conv, never past it to project_in
    near = neighbours(model, SENSITIVE)
    assert "/body/body.0/blocks/blocks.1/transformer/dwconv/Conv" in near
    assert "/body/body.0/blocks/blocks.1/transformer/project_in/Conv" not in near


def test_rerank_measures_only_leaders_and_neighbours(fp32):
    class Counting:  # stands in for Evaluator: counts model evaluations, scores by graph size
        calls = 0

        def rank_score(self, blob):
            Counting.calls += 1
            return float(len(blob))

    model = onnx.load(str(fp32))
    names = [n.name for n in model.graph.node if n.op_type in TRT_OPS]
    ranking = [{"node": n} for n in names]
    near = {names[-1]}
    out = rerank(model, Counting(), ranking, near, [], {}, lambda _m: None)
    assert sorted(r["node"] for r in out) == sorted(names)
    fresh = RERANK_LEADERS + 1
    assert Counting.calls == fresh + 1  # each re-measured node, plus the base model once
    assert [r["node"] for r in out[fresh:]] == names[RERANK_LEADERS:-1]  # the rest keep their order


def test_mac_shares_weigh_hr_convs(fp32):
    from paragon_export.int8_check import mac_shares

    shares = mac_shares(onnx.load(str(fp32)))
    assert sum(shares.values()) == pytest.approx(1.0)
    # same 3x3 C->C conv, at HR (x2 each side) vs LR: exactly 4x the work
    assert shares["/upsampler/Conv"] == pytest.approx(4 * shares["/conv_fuse/Conv"])
    assert max(shares, key=shares.get) == "/upsampler/Conv"


def test_bias_correction_removes_the_mean_shift_of_int8_weights(fp32, calib, cache_dir, tmp_path):
    from paragon_export.int8_bias import bias_deltas, corrected, input_channel_means, undo_map
    from paragon_export.int8_check import inspect_qdq

    ranges = calibration_ranges(fp32, calib, "percentile", cache_dir=cache_dir, op_types=TRT_OPS, inputs_only=True)
    quantize_symmetric(fp32, tmp_path / "plain.onnx", ranges)
    plain, proto = onnx.load(str(tmp_path / "plain.onnx")), onnx.load(str(fp32))
    nodes = inspect_qdq(plain)["quantized_nodes"]
    deltas = bias_deltas(plain, input_channel_means(proto, calib, nodes))
    assert set(deltas) == set(nodes) and all(np.isfinite(d).all() for d in deltas.values())
    onnx.save(corrected(proto, deltas), str(tmp_path / "fp32_corr.onnx"))
    quantize_symmetric(tmp_path / "fp32_corr.onnx", tmp_path / "corr.onnx", ranges)

    shift_plain, shift_corr, p_plain, p_corr = [], [], [], []
    for h in calib.holdout:
        r = infer(fp32, h.lr)
        a, b = infer(tmp_path / "plain.onnx", h.lr), infer(tmp_path / "corr.onnx", h.lr)
        shift_plain.append((a - r).mean(axis=(0, 2, 3)))
        shift_corr.append((b - r).mean(axis=(0, 2, 3)))
        p_plain.append(psnr(np.clip(a, 0, 1), np.clip(r, 0, 1)))
        p_corr.append(psnr(np.clip(b, 0, 1), np.clip(r, 0, 1)))
    # the per-channel mean error of the output shrinks, and the image gets closer to fp32
    assert np.abs(np.mean(shift_corr, 0)).max() < 0.75 * np.abs(np.mean(shift_plain, 0)).max()
    assert np.mean(p_corr) > np.mean(p_plain)

    # keeping a node in float puts its trained bias back: the shortcut equals a real requantization
    node = "/magic_upsampler/Conv"
    shortcut = keep_float(onnx.load(str(tmp_path / "corr.onnx")), [node], undo_map(proto, deltas))
    onnx.save(corrected(proto, deltas, skip=[node]), str(tmp_path / "fp32_corr2.onnx"))
    quantize_symmetric(tmp_path / "fp32_corr2.onnx", tmp_path / "corr2.onnx", ranges, [node])
    x = calib.batch(0)
    np.testing.assert_allclose(infer(shortcut.SerializeToString(), x),
                               infer(tmp_path / "corr2.onnx", x), atol=1e-5)


def test_native_kernels_are_reported_apart_and_never_gate(default_run, fp32, tmp_path):
    from paragon_export.checkpoint import save_model
    from paragon_export.cpu import isa
    from paragon_export.parity import parity

    native = default_run.native_kernels  # ISA-dependent numbers: only their form is asserted
    assert native.isa == isa() and native.images == 4
    assert native.psnr_vs_reference is None or native.psnr_vs_reference > 0
    ckpt = tmp_path / "nano_x2.safetensors"
    save_model(seeded_fused(0), ckpt, variant="paragonsr2_nano", force=True)
    rep = parity([ckpt, fp32, default_run.path], tmp_path / "parity", sizes="32x32,19x23")
    rows = {a.runner: a for a in rep.artifacts if a.precision == "int8"}
    assert rows["onnxrt-cpu"].status == "pass" and rows["onnxrt-cpu"].gated
    assert rows["onnxrt-cpu-native"].status == "info" and not rows["onnxrt-cpu-native"].gated
    assert f"[native {isa()}]" in rows["onnxrt-cpu-native"].name
