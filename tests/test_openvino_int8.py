"""INT8 per runtime: the measured cause of a runtime failing an int8 file (openvino_int8.diagnose), its place
in parity's failing row, and the model card's list of the runtimes each file is verified on. Nothing here
depends on whether OpenVINO's int8 kernels fail on this CPU: the runtimes that break a file are real ONNX
Runtime sessions of a deliberately altered file, and OpenVINO rows are made to fail by a limit no int8 meets."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from paragon_export.calibration import build_calibration_set
from paragon_export.checkpoint import save_model
from paragon_export.errors import ParagonError
from paragon_export.int8_search import TRT_EXTRA_OPTIONS, TRT_OPS
from paragon_export.int8_check import quiet_quantizer, trt_int8_exclusions
from paragon_export.onnx_graph import ort_session
from paragon_export.openvino_int8 import NARROW, diagnose, int8_convs, keep_int8, narrow_weights
from paragon_export.parity import parity
from paragon_export.parity_report import ParityReport, card_lines
from paragon_export.release import release
from paragon_export.runners import onnx_runner
from conftest import write_model
from test_int8 import SMALL, export_fp32, seeded_fused

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino not installed (pip install 'paragon-export[openvino]')")
LIMIT = 32.0


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """A Q/DQ int8 file of a seeded nano, the TensorRT recipe (symmetric, per-channel, conv inputs only,
    no int8 where TensorRT has no kernel)."""
    d = tmp_path_factory.mktemp("q8")
    fp32 = export_fp32(seeded_fused(0), d / "nano_x2_fp32.onnx")
    calib = build_calibration_set(None, scale=2, **SMALL)
    out = d / "nano_x2_int8.onnx"
    with quiet_quantizer():
        quantize_static(str(fp32), str(out), calib, quant_format=QuantFormat.QDQ, op_types_to_quantize=TRT_OPS,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(trt_int8_exclusions(onnx.load(str(fp32)))),
                        extra_options=dict(TRT_EXTRA_OPTIONS))
    feeds = [{"input": calib.holdout[0].lr.transpose(2, 0, 1)[None].copy()}]
    return {"path": out, "fp32": fp32, "model": onnx.load(str(out)), "feeds": feeds}


def _out(model, feed):
    return ort_session(model.SerializeToString(), threads=1).run(None, feed)[0]


def _weight_scale(model, conv):
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == conv)
    return numpy_helper.to_array(inits[prod[node.input[1]].input[1]]).astype(np.float64)


def test_variants_keep_one_conv_int8_and_narrow_weights_to_7_bits(q8):
    model, feed = q8["model"], q8["feeds"][0]
    convs = int8_convs(model)
    assert len(convs) >= 4
    assert int8_convs(keep_int8(model, set())) == []
    assert int8_convs(keep_int8(model, {convs[1]})) == [convs[1]]
    # keeping every conv int8 is the file itself, bit for bit
    np.testing.assert_array_equal(_out(keep_int8(model, set(convs)), feed), _out(model, feed))
    narrow = narrow_weights(model)
    for c in convs:
        np.testing.assert_allclose(_weight_scale(narrow, c), _weight_scale(model, c) / NARROW, rtol=1e-6)
    # wider weight steps are coarser: the narrowed file is further from fp32, but still the same model
    fp32 = _out(onnx.load(str(q8["fp32"])), feed)
    err = lambda m: float(np.abs(_out(m, feed) - fp32).mean())  # noqa: E731
    assert err(model) < err(narrow) < 10 * err(model)


def _breaking_runtime(tmp_path, broken: str | None = None, saturate: bool = False):
    """A runtime that computes int8 wrongly, as a real ORT session of an altered file: `broken` conv's
    weights are off by 30 % while it is int8; `saturate` clips int8 weights beyond 7 bits (u8s8 overflow)."""
    def make(path):
        m = onnx.load(str(path))
        prod = {o: n for n in m.graph.node for o in n.output}
        inits = {i.name: i for i in m.graph.initializer}
        for c in int8_convs(m):
            node = next(n for n in m.graph.node if n.name == c)
            dq = prod[node.input[1]]
            w_name, s = prod[dq.input[0]].input[0], _weight_scale(m, c)
            w = numpy_helper.to_array(inits[w_name])
            if c == broken:
                w = w * 1.3
            if saturate:
                lim = 64 * s.reshape(-1, *[1] * (w.ndim - 1)) if node.op_type == "Conv" else None
                w = np.clip(w, -lim, lim) if lim is not None else w
            inits[w_name].CopyFrom(numpy_helper.from_array(w.astype(numpy_helper.to_array(inits[w_name]).dtype), w_name))
        return onnx_runner(m.SerializeToString(), name="altered")
    return make


def test_diagnose_names_the_conv_that_breaks_the_runtime(q8, tmp_path):
    target = int8_convs(q8["model"])[-1]  # the last conv: its error reaches the output undamped
    d = diagnose(q8["path"], _breaking_runtime(tmp_path, broken=target), q8["feeds"], 60.0, runtime="R")
    assert d.breaking == [target]
    assert d.psnr_vs_reference < 60 and d.narrow_weights_psnr < 60 and not d.weight_saturation
    others = [p for n, p in d.alone.items() if n != target]
    assert len(others) == len(int8_convs(q8["model"])) - 1 and min(others) == float("inf")  # identical: ORT is the reference
    assert target in d.reason() and "not weight saturation" in d.reason()
    # a faithful runtime: nothing to blame
    ok = diagnose(q8["path"], lambda p: onnx_runner(p, name="ort"), q8["feeds"], 60.0, runtime="R")
    assert ok.breaking == [] and ok.psnr_vs_reference == float("inf") and "computes the file as written" in ok.reason()


def test_diagnose_recognises_weight_saturation(q8, tmp_path):
    d = diagnose(q8["path"], _breaking_runtime(tmp_path, saturate=True), q8["feeds"], 60.0, runtime="R")
    assert d.psnr_vs_reference < 60 <= d.narrow_weights_psnr and d.weight_saturation
    assert "u8s8 saturation of 8-bit weights" in d.reason()


@needs_openvino
def test_failing_openvino_int8_row_gives_the_measured_cause_and_the_card_lists_passing_rows(q8, tmp_path):
    ckpt = save_model(seeded_fused(0), tmp_path / "nano_x2.safetensors", variant="paragonsr2_nano").path
    # No int8 meets 200 dB: every int8 row fails on any CPU, and the OpenVINO one gets its cause measured.
    rep = parity([ckpt, q8["fp32"], q8["path"]], tmp_path / "p", png_crops=0, sizes="24x24", min_psnr=200.0)
    ov = next(a for a in rep.artifacts if a.runner == "openvino-cpu" and a.precision == "int8")
    ort = next(a for a in rep.artifacts if a.runner == "onnxrt-cpu" and a.precision == "int8")
    assert ov.status == ort.status == "fail"
    assert any(r.startswith("OpenVINO vs this file's own Q/DQ semantics") for r in ov.reasons)
    assert not any("Q/DQ semantics" in r for r in ort.reasons)
    verdicts = rep.runtime_verdicts()
    for name, v in verdicts.items():
        rows = [a for a in rep.artifacts if a.path and a.path.endswith(name) and a.role in ("artifact", "runtime")]
        assert v["verified"] == [a.runner for a in rows if a.status == "pass"]
        assert [n["runner"] for n in v["not_verified"]] == [a.runner for a in rows if a.status in ("fail", "error", "skipped")]
    card = "\n".join(card_lines(verdicts))
    line = next(ln for ln in card.splitlines() if ln.startswith(f"- `{q8['path'].name}`"))
    assert "verified on no runtime" in line and "**not verified** on openvino-cpu (FAIL: " in line
    assert "OpenVINO vs this file's own Q/DQ semantics" in line


def test_release_card_lists_the_runtimes_each_file_passed(tmp_path):
    out = tmp_path / "rel"
    release(write_model(tmp_path / "nano.safetensors", seed=3), out, precisions=("fp32",), engine=False,
            progress=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    verdicts = next(a["meta"]["runtimes"] for a in m["steps"]["parity"]["artifacts"] if a["kind"] == "parity-json")
    rep = json.loads((out / "parity" / "parity.json").read_text())
    assert verdicts == ParityReport.from_json(rep).runtime_verdicts()
    card = (out / "MODEL_CARD.md").read_text()
    assert "\n".join(card_lines(verdicts)) in card
    assert "onnxrt-cpu" in verdicts["paragonsr2_nano_x2_fp32_op17.onnx"]["verified"]


def _readers(model):
    out = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def test_dedicated_qdq_leaves_convs_int8_and_other_readers_float(q8):
    from paragon_export.int8_openvino import dedicate_qdq

    model = q8["model"]
    derived, rewired = dedicate_qdq(model)
    assert rewired >= 1  # the residual Adds of the seeded nano read a shared DQ
    assert int8_convs(derived) == int8_convs(model)
    for dq in (n for n in derived.graph.node if n.op_type == "DequantizeLinear"):
        assert all(r.op_type in ("Conv", "ConvTranspose") for r in _readers(derived).get(dq.output[0], []))
    # the same model, less one rounding on the residual path: closer to fp32, not further
    feed = q8["feeds"][0]
    fp32 = _out(onnx.load(str(q8["fp32"])), feed)
    assert np.abs(_out(derived, feed) - fp32).mean() < np.abs(_out(model, feed) - fp32).mean()


@needs_openvino
def test_openvino_int8_file_passes_on_openvino_and_leaves_the_tensorrt_file_alone(q8, tmp_path):
    from paragon_export.int8_openvino import write_openvino_int8
    from paragon_export.onnx_graph import read_metadata

    from paragon_export.artifact import sha256_file

    before = sha256_file(q8["path"])
    art = write_openvino_int8(q8["path"], tmp_path, force=False)
    assert sha256_file(q8["path"]) == before and art.path.name == "nano_x2_int8_openvino.onnx"
    meta = read_metadata(art.path)
    assert meta["target_runtime"] == "openvino" and meta["derived_from_sha256"] == before
    assert art.check.max_abs <= 0.25 and not art.check.fails() and art.parent == q8["path"].name
    assert list(art.check.to_json()) == ["min_psnr", "max_abs"]  # the release manifest keeps its keys
    ckpt = save_model(seeded_fused(0), tmp_path / "nano_x2.safetensors", variant="paragonsr2_nano").path
    rep = parity([ckpt, art.path], tmp_path / "p", png_crops=0)  # the photos and sizes the file was checked on
    rows = [a for a in rep.artifacts if a.path == str(art.path) and a.role in ("artifact", "runtime")]
    assert [(a.runner, a.gated, a.status) for a in rows] == [("onnxrt-cpu", True, "pass"),
                                                                      ("openvino-cpu", True, "pass")]
    with pytest.raises(ParagonError, match="already exists"):
        write_openvino_int8(q8["path"], tmp_path)


def test_openvino_file_bad_inputs_are_one_line_errors(q8, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from paragon_export import runners
    from paragon_export.cli import main
    from paragon_export.int8_openvino import write_openvino_int8

    with pytest.raises(ParagonError, match="is not a Q/DQ int8 file"):
        write_openvino_int8(q8["fp32"], tmp_path)
    monkeypatch.setattr(runners, "runtime_unavailable",
                        lambda rt: "openvino is not installed (pip install 'paragon-export[openvino]')")
    with pytest.raises(ParagonError, match=r"checked on OpenVINO: openvino is not installed"):
        write_openvino_int8(q8["path"], tmp_path)
    # refused before any quantization: nothing is written
    r = CliRunner().invoke(main, ["int8", str(q8["fp32"]), "-o", str(tmp_path / "o"), "--openvino"])
    assert r.exit_code == 1 and "--openvino: openvino is not installed" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert not any(tmp_path.iterdir())  # and the refused write_openvino_int8 calls wrote nothing
