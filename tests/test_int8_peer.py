"""The int8 report's peer: NVIDIA ModelOpt's ONNX PTQ run on CPU with our calibration crops, on a
seeded nano fp32 export, checked with real ONNX Runtime sessions on real held-out photos."""

from __future__ import annotations

import builtins

import numpy as np
import onnx
import pytest

from paragon_export.calibration import build_calibration_set
from paragon_export.errors import ParagonError
from paragon_export.int8_check import inspect_qdq, trt_int8_exclusions
from paragon_export.int8_eval import run, session
from paragon_export.int8_peer import PeerUnavailable, modelopt_peer
from paragon_export.metrics import psnr
from test_int8 import SMALL, export_fp32, seeded_fused

@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    pytest.importorskip("onnx_graphsurgeon", reason="ModelOpt's ONNX extras are not installed ([modelopt-onnx])")
    fp32 = export_fp32(seeded_fused(0), tmp_path_factory.mktemp("onnx") / "nano_x2_fp32.onnx")
    calib = build_calibration_set(None, scale=2, **SMALL)
    out_dir = tmp_path_factory.mktemp("peer")
    result = modelopt_peer(fp32, calib, out_dir / "nano_x2_modelopt.onnx")
    return fp32, calib, out_dir, result


def test_peer_is_int8_qdq_with_an_fp16_remainder(peer):
    fp32, _, out_dir, r = peer
    assert r["model"] == str(out_dir / "nano_x2_modelopt.onnx")
    # Nothing else left in the output folder: no intermediate models, no external data file.
    assert sorted(p.name for p in out_dir.iterdir()) == ["nano_x2_modelopt.onnx"]
    assert "ModelOpt 0." in r["recipe"] and "calibration_eps=['cpu']" in r["recipe"]

    model = onnx.load(r["model"])
    info = inspect_qdq(model)
    assert info["q_nodes"] > 0 and info["dq_nodes"] > 0
    assert info["zero_point_types"] == ["int8"] and info["zero_points_all_zero"]  # symmetric int8
    assert info["weights_per_channel"] and not info["foreign_domains"]
    assert info["opset"] >= 19  # fp16 Q/DQ scales need opset 19

    # Its remainder: every float initializer (weights, biases, Q/DQ scales) is fp16; the graph keeps
    # fp32 I/O with a Cast at each end.
    assert r["remainder"] == "fp16"
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    io = list(model.graph.input) + list(model.graph.output)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in io)
    assert sum(n.op_type == "Cast" for n in model.graph.node) >= 2

    # The convs it left unquantized are exactly those our int8_check reproduces its rules for.
    assert r["excluded_nodes"] == info["float_nodes"]
    assert set(r["excluded_nodes"]) == set(trt_int8_exclusions(onnx.load(str(fp32))))
    assert len(info["quantized_nodes"]) > 0


def test_peer_output_is_close_to_fp32_on_real_photos(peer):
    fp32, calib, _, r = peer
    assert calib.holdout
    with session(fp32) as ref, session(r["model"]) as sess:  # Q/DQ reference semantics
        for h in calib.holdout:
            a, b = np.clip(run(ref, h.lr), 0, 1), np.clip(run(sess, h.lr), 0, 1)
            assert b.shape == a.shape and b.dtype == np.float32
            assert psnr(b, a) > 30, h.name


def test_missing_extras_raise_one_line_with_the_install_hint(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_extras(name, *args, **kwargs):
        if name == "onnx_graphsurgeon":
            raise ImportError("No module named 'onnx_graphsurgeon'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extras)
    with pytest.raises(PeerUnavailable) as e:
        modelopt_peer(tmp_path / "missing.onnx", None, tmp_path / "out" / "peer.onnx")
    msg = str(e.value)
    assert isinstance(e.value, ParagonError)  # the CLI prints it as one line, no traceback
    assert "\n" not in msg and "onnx_graphsurgeon" in msg
    assert "pip install" in msg and "paragon-export[modelopt-onnx]" in msg
    assert not (tmp_path / "out").exists()
