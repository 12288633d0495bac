"""The community ONNX profile, and chaiNNer's scale detection (pin H/W, strict ONNX shape inference)
on every kind of ONNX file the pipeline writes: fp32, fp16, int8 Q/DQ with an fp32 remainder (op17)
and with the fp16 remainder (op19), QAT, and both community files. Each is made once, by the real
step on the same seeded nano model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from chainner_scale import CHAINNER_SIZES, chainner_scale, infer_shapes
from conftest import write_model
from paragon_export.cli import main
from paragon_export.onnx_graph import ort_session, read_metadata, run_session
from paragon_export.verify import LIMITS, compare, verification_inputs

SIZES = ((32, 32), (27, 45))  # LR; the second is non-square and not a multiple of 8
CALIB = {"lr_size": (16, 16), "eval_size": (32, 32), "crops_per_image": 1, "batch_size": 2}
KINDS = ("fp32", "fp16", "int8_fp32_remainder", "int8_fp16_remainder", "qat", "community_fp32", "community_fp16")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{kind: path} of every ONNX kind the pipeline writes, plus the community CLI's output."""
    from paragon_export.calibration import build_calibration_set
    from paragon_export.export_onnx import export_onnx
    from paragon_export.export_recipe import ExportRecipe
    from paragon_export.int8 import quantize_int8
    from paragon_export.int8_recipe import Int8Recipe
    from paragon_export.qat import qat
    from paragon_export.qat_recipe import QATRecipe

    d = tmp_path_factory.mktemp("written")
    ckpt = write_model(d / "2x_Nano.safetensors", fused=True)
    plain = export_onnx(ckpt, d / "plain", ExportRecipe(fp16=True), verify_sizes=SIZES)
    calib = build_calibration_set(None, scale=2, **CALIB)
    out = {"fp32": plain["fp32"].path, "fp16": plain["fp16"].path, "ckpt": ckpt}
    for remainder in ("fp32", "fp16"):
        art = quantize_int8(plain["fp32"].path, d / f"int8_{remainder}", Int8Recipe(remainder=remainder, node_budget=0),
                            calib=calib, cache_dir=d / "cache", peer=False)
        out[f"int8_{remainder}_remainder"] = art.path
    art, _ = qat(ckpt, d / "qat", QATRecipe(steps=0, batch=2, patch=16, **CALIB), verify_sizes=SIZES,
                 ptq_baseline=False, bar=False)
    out["qat"] = art.path
    r = CliRunner().invoke(main, ["onnx", str(ckpt), "-o", str(d / "community"), "--profile", "community"])
    assert r.exit_code == 0, r.output
    out["community_fp32"], out["community_fp16"] = d / "community/2x_Nano_fp32.onnx", d / "community/2x_Nano_fp16.onnx"
    out["cli_output"] = r.output
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_chainner_reads_the_scale_of_every_written_onnx(written, kind):
    model = onnx.load(str(written[kind]))
    # At chaiNNer's first size (so it asks for no larger size multiple than the model needs) and another.
    for size in CHAINNER_SIZES[:2]:
        (_, _, h, w), out = infer_shapes(model, size)
        assert out[2:] == [2 * h, 2 * w], (kind, size, out)
        assert chainner_scale(model, size) == 2
    assert read_metadata(model)["scale"] == "2"


def test_a_stale_shape_fails_strict_inference_though_onnx_runtime_runs_it(written):
    """What the check guards against: a graph carrying a shape recorded at trace time (40x56)
    still runs on ORT at other sizes, but chaiNNer's strict inference refuses it."""
    model = onnx.load(str(written["community_fp32"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    channels = next(i.dims[0] for i in model.graph.initializer if i.name == conv.input[1])
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(conv.output[0], onnx.TensorProto.FLOAT,
                                                                     [1, channels, 40, 56]))
    x = verification_inputs(2, [(16, 16)], batch=1)[0][2]
    assert run_session(ort_session(model), x).shape == (1, 3, 32, 32)
    with pytest.raises(onnx.shape_inference.InferenceError):
        chainner_scale(model)


def _io(model: onnx.ModelProto) -> list:
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (model.graph.input[0], model.graph.output[0])]


def test_community_files_are_batch_1_dynamic_hw_named_and_verified(written):
    f32, f16 = onnx.load(str(written["community_fp32"])), onnx.load(str(written["community_fp16"]))
    fl, half = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert _io(f32) == [("input", fl, [1, 3, "height", "width"]), ("output", fl, [1, 3, "out_height", "out_width"])]
    assert _io(f16) == [("input", half, [1, 3, "height", "width"]), ("output", half, [1, 3, "out_height", "out_width"])]
    for m, io in ((f32, "float32"), (f16, "float16")):
        md = read_metadata(m)
        assert (md["scale"], md["profile"], md["io_dtype"], md["input_shape"]) == ("2", "community", io, "1x3xHxW")
    text = written["cli_output"]
    assert "input 1x3xHxW" in text and "batch2" not in text  # verified without a batch the graph cannot take
    assert "verified fp32" in text and "verified fp16" in text and "2x_Nano_fp16.onnx" in text
    # At a size no verification used: fp32 file = plain export, fp16 file within the fp16 limits.
    x = verification_inputs(2, [(23, 31)], batch=1)[0][2]
    ref = run_session(ort_session(written["fp32"]), x)
    assert compare(run_session(ort_session(f32), x), ref).max_abs <= LIMITS["fp32"].max_abs
    assert not compare(run_session(ort_session(f16), x), ref).failures(LIMITS["fp16"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the batch is fixed
        ort_session(f32).run(None, {"input": np.concatenate([x, x])})


def test_community_profile_bad_combinations_are_one_line_errors(written, tmp_path):
    r = CliRunner().invoke(main, ["onnx", str(written["ckpt"]), "-o", str(tmp_path), "--profile", "community",
                                  "--static-shape", "64x64"])
    assert r.exit_code == 1 and "drop --static-shape" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["onnx", str(written["ckpt"]), "-o", str(tmp_path), "--profile", "anime"])
    assert r.exit_code == 2 and "'anime' is not one of" in r.output
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("source,name", [
    ("paragonsr2_nano_x2_fused.safetensors", "2x_paragonsr2_nano_fp16.onnx"), ("2x_Nano.pth", "2x_Nano_fp16.onnx"),
    ("Anime_2x.safetensors", "2x_Anime_fp16.onnx"), ("net_g_1000.pth", "2x_net_g_1000_fp16.onnx"),
    ("x4_Foo.pth", "2x_x4_Foo_fp16.onnx"),  # another scale's tag is the user's name, not ours to drop
])
def test_community_file_names(source, name):
    from paragon_export.export_onnx import community_filename

    assert community_filename(source, 2, "fp16") == name
