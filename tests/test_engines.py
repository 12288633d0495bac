"""engines/: everything that does not need TensorRT or a GPU, on real ONNX exports of a seeded nano model.

The TensorRT compile itself (and Polygraphy's TensorRT runner) run only in tests/gpu/smoke.py; here the
bookkeeping around them runs with a fake target GPU and a stand-in compile step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from paragon_export.engines import (BuildOptions, EngineMismatch, GpuInfo, Profile, Target, build_engine, choose_profile,
                     engine_filename, incompatibility, inspect_onnx, load_engine, make_key, parse_profile,
                     preset_profile, read_manifest, rebuild_engine, trtexec_command, validate_profile)
from paragon_export.engines.check import CheckRow, EngineCheck, find_reference, run_check, verdict_row
from paragon_export.engines.gpu import parse_nvidia_smi, query_gpu
from paragon_export.engines.manifest import entry_for_file, put_entry, remove_entry
from paragon_export.engines.onnx_info import detect_precision
from paragon_export.errors import ParagonError

from conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
H200 = GpuInfo("NVIDIA H200", (9, 0), 143771, "fake")
L4 = GpuInfo("NVIDIA L4", (8, 9), 23034, "fake")
T4 = GpuInfo("Tesla T4", (7, 5), 15360, "fake")


# ---------------------------------------------------------------- real ONNX files (exported once)

def _export(model, path: Path) -> Path:
    torch.onnx.export(model, torch.rand(1, 3, 32, 32), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "output": {0: "n", 2: "oh", 3: "ow"}})
    return path


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    """fp32, fp16 (fp32 I/O) and symmetric Q/DQ int8 exports of the same fused nano x2 model."""
    import warnings

    from onnxconverter_common import float16
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from paragon_export.images import lr_hr_crops, sample_photo_paths

    d = tmp_path_factory.mktemp("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = _export(make_model(fused=True), d / "nano_x2_fp32.onnx")
    m = onnx.load(str(fp32))
    m.graph.ClearField("value_info")
    onnx.save(float16.convert_float_to_float16(m, keep_io_types=True), str(d / "nano_x2_fp16.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            crops = lr_hr_crops(sample_photo_paths("train")[:4], 2, (32, 32))
            self.it = iter([{"input": np.ascontiguousarray(lr.transpose(2, 0, 1)[None])} for _, lr, _ in crops])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(d / "nano_x2_int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return d


@pytest.fixture(scope="module")
def fp32_info(onnx_dir):
    return inspect_onnx(onnx_dir / "nano_x2_fp32.onnx")


def _with_meta(src: Path, dst: Path, **meta) -> Path:
    m = onnx.load(str(src))
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(dst))
    return dst


# ---------------------------------------------------------------- profiles

def test_parse_profile_both_shape_forms():
    p = parse_profile("1x3x64x64:2x3x512x512:4x3x576x576")
    assert p.min == (1, 3, 64, 64) and p.opt == (2, 3, 512, 512) and p.max == (4, 3, 576, 576)
    q = parse_profile("64x96:512x512:1080x1920")
    assert q.min == (1, 3, 64, 96) and q.max == (1, 3, 1080, 1920)
    assert str(q) == "1x3x64x96:1x3x512x512:1x3x1080x1920"
    assert Profile.from_dict(q.as_dict()) == q


@pytest.mark.parametrize("text", ["64x64:512x512", "64x64:abc:128x128", "1x3x64:64x64:64x64", "",
                                  "64x64:64x64:64x64:1"])
def test_parse_profile_rejects_malformed(text):
    with pytest.raises(ParagonError, match="bad profile"):
        parse_profile(text)


@pytest.mark.parametrize("text, message", [
    ("64x64:32x32:128x128", "height must satisfy min <= opt <= max"),
    ("64x64:64x200:128x128", "width must satisfy"),
    ("2x3x64x64:1x3x64x64:2x3x64x64", "batch must satisfy"),
    ("1x1x64x64:1x1x64x64:1x1x64x64", "channel count must be 3"),
    ("1x3x0x64:1x3x64x64:1x3x64x64", ">= 1"),
    ("8x64:64x64:128x128", r"below the model's minimum input 9x9"),
])
def test_validate_profile_rejects(fp32_info, text, message):
    with pytest.raises(ParagonError, match=message):
        validate_profile(parse_profile(text), fp32_info)


def test_presets_fit_the_model_and_are_lr_sized(fp32_info):
    for name in ("720p", "1080p", "4k-tiles"):
        p = validate_profile(preset_profile(name), fp32_info)
        assert p.min[2:] == (64, 64)
    assert preset_profile("720p").opt == (1, 3, 720, 1280)
    assert preset_profile("1080p").opt == (1, 3, 1080, 1920)
    assert preset_profile("4k-tiles").opt == (4, 3, 512, 512)
    assert choose_profile(fp32_info) == preset_profile("720p")
    with pytest.raises(ParagonError, match="unknown preset"):
        preset_profile("8k")
    with pytest.raises(ParagonError, match="either --profile or --preset"):
        choose_profile(fp32_info, profile="64x64:64x64:64x64", preset="720p")


@pytest.mark.parametrize("name, long_side", [("720p", 1280), ("1080p", 1920)])
def test_video_presets_take_portrait_and_landscape_frames(name, long_side):
    """A phone video is 720x1280 or 1280x720 (HxW): both must fit the preset's max."""
    p = preset_profile(name)
    short = {"720p": 720, "1080p": 1080}[name]
    for h, w in ((short, long_side), (long_side, short)):
        assert p.min[2] <= h <= p.max[2] and p.min[3] <= w <= p.max[3], (name, h, w)


def test_profile_follows_fixed_dims(fp32_info):
    static = dataclasses.replace(fp32_info, input_dims=(1, 3, 96, 128))
    assert choose_profile(static) == Profile((1, 3, 96, 128), (1, 3, 96, 128), (1, 3, 96, 128))
    with pytest.raises(ParagonError, match="fixed height of 96"):
        choose_profile(static, profile="96x128:96x128:192x128")
    fixed_batch = dataclasses.replace(fp32_info, input_dims=(1, 3, None, None))
    assert choose_profile(fixed_batch, preset="4k-tiles").max == (1, 3, 576, 576)
    with pytest.raises(ParagonError, match="fixed batch of 1"):
        choose_profile(fixed_batch, profile="1x3x64x64:2x3x64x64:2x3x64x64")


# ---------------------------------------------------------------- ONNX facts: precision, minimum size

def test_precision_detected_from_real_graphs(onnx_dir):
    got = {p: inspect_onnx(onnx_dir / f"nano_x2_{p}.onnx") for p in ("fp32", "fp16", "int8")}
    assert {p: i.precision for p, i in got.items()} == {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}
    for info in got.values():
        assert info.input_name == "input" and info.output_name == "output"
        assert info.input_dims == (None, 3, None, None) and info.input_dtype == "float32"
        assert info.min_hw == (9, 9)  # nano's 1x9 / 9x1 band convs (bk=9), read from the graph
    assert len({i.sha256 for i in got.values()}) == 3


def test_precision_metadata_is_cross_checked_and_the_graph_decides(onnx_dir, tmp_path):
    src = onnx_dir / "nano_x2_int8.onnx"
    agree = inspect_onnx(_with_meta(src, tmp_path / "a.onnx", precision="int8"))
    assert agree.precision == "int8" and "matches the graph" in agree.precision_note
    assert inspect_onnx(_with_meta(src, tmp_path / "b.onnx", precision="INT8-QDQ")).precision == "int8"
    # ORT's quantizer copies the fp32 source's metadata: the Q/DQ graph still builds as int8, with a note
    stale = inspect_onnx(_with_meta(src, tmp_path / "c.onnx", precision="fp32"))
    assert stale.precision == "int8"
    assert stale.precision_note == ("metadata says precision='fp32' but the graph is int8 (it has Q/DQ nodes): "
                                    "using int8")
    assert detect_precision(onnx.load(str(_with_meta(src, tmp_path / "d.onnx", precision="bf16"))))[0] == "int8"
    fp16 = inspect_onnx(_with_meta(onnx_dir / "nano_x2_fp16.onnx", tmp_path / "e.onnx", precision="fp32"))
    assert fp16.precision == "fp16" and "fp16 weights or casts" in fp16.precision_note
    fp32 = inspect_onnx(_with_meta(onnx_dir / "nano_x2_fp32.onnx", tmp_path / "f.onnx", precision="fp16"))
    assert fp32.precision == "fp32" and "no Q/DQ nodes and no fp16 tensors" in fp32.precision_note


def test_min_size_metadata_overrides_the_graph(onnx_dir, tmp_path):
    info = inspect_onnx(_with_meta(onnx_dir / "nano_x2_fp32.onnx", tmp_path / "m.onnx", min_size="16x24"))
    assert info.min_hw == (16, 24)
    with pytest.raises(ParagonError, match="below the model's minimum input 16x24"):
        validate_profile(parse_profile("16x16:64x64:64x64"), info)


def test_inspect_rejects_non_onnx(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(ParagonError, match="not a readable ONNX model"):
        inspect_onnx(bad)


# ---------------------------------------------------------------- identity and naming

def _key(gpu=H200, trt="10.3.0", **kw):
    args = dict(precision="fp16", input_name="input", profile=preset_profile("720p"), options=BuildOptions(),
                onnx_sha256="ab" * 32)
    args.update(kw)
    return make_key(gpu, trt, **args)


def test_engine_key_changes_with_every_field():
    base = _key()
    assert base.digest == _key().digest and len(base.digest) == 16
    variants = [_key(gpu=L4), _key(trt="10.4.0"), _key(precision="int8"), _key(input_name="x"),
                _key(profile=preset_profile("1080p")), _key(options=BuildOptions(workspace_gb=2.0)),
                _key(options=BuildOptions(hardware_compat="ampere+")), _key(onnx_sha256="cd" * 32)]
    assert len({v.digest for v in variants} | {base.digest}) == len(variants) + 1
    assert type(base).from_dict(json.loads(json.dumps(base.as_dict()))) == base


def test_engine_file_names():
    k = _key()
    assert engine_filename("nano_x2_fp16_op17", k) == f"nano_x2_fp16_op17_h200-sm90_trt10.3.0_{k.digest[:8]}.engine"
    rtx = _key(gpu=GpuInfo("NVIDIA GeForce RTX 4090", (8, 9)), trt="11.0.0.12")
    assert engine_filename("m", rtx).startswith("m_geforce-rtx-4090-sm89_trt11.0.0.12_")
    amp = _key(options=BuildOptions(hardware_compat="ampere+"))
    assert engine_filename("m", amp).startswith("m_ampere-plus_trt10.3.0_")


def test_incompatibility_rules():
    k = _key()
    assert incompatibility(k, H200, "10.3.0") is None
    assert "NVIDIA L4" in incompatibility(k, L4, "10.3.0") and "NVIDIA H200" in incompatibility(k, L4, "10.3.0")
    assert "TensorRT 10.3.0" in incompatibility(k, H200, "10.4.0")
    amp = _key(options=BuildOptions(hardware_compat="ampere+"))
    assert incompatibility(amp, L4, "10.3.0") is None
    assert "older than Ampere" in incompatibility(amp, T4, "10.3.0")
    assert "TensorRT" in incompatibility(amp, L4, "11.0.0")


# ---------------------------------------------------------------- manifest

def test_manifest_round_trip_is_atomic(tmp_path):
    assert read_manifest(tmp_path)["engines"] == {}
    put_entry(tmp_path, "d1", {"file": "a.engine", "key": {"gpu": "x"}})
    put_entry(tmp_path, "d2", {"file": "b.engine", "key": {"gpu": "y"}})
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "paragon-export/engines" and set(data["engines"]) == {"d1", "d2"}
    assert entry_for_file(tmp_path, "b.engine") == ("d2", {"file": "b.engine", "key": {"gpu": "y"}})
    assert entry_for_file(tmp_path, "c.engine") is None
    remove_entry(tmp_path, "d1")
    assert set(read_manifest(tmp_path)["engines"]) == {"d2"}
    assert not list(tmp_path.glob(".manifest.json.*"))  # no temp file left behind


def test_manifest_concurrent_writers_keep_every_entry(tmp_path):
    def writer(t):
        for i in range(10):
            put_entry(tmp_path, f"t{t}-{i}", {"file": f"{t}-{i}.engine"})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(read_manifest(tmp_path)["engines"]) == 40


def test_manifest_corrupt_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ParagonError, match="manifest.json is unreadable"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"a": 1}')
    with pytest.raises(ParagonError, match="not a paragon-export engine manifest"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- build bookkeeping (fake target, stand-in compile)

class FakeCompile:
    """Stands in for TensorRT's compile step: returns a plan that encodes what it was asked to build."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, profile, options, cache):
        self.calls.append((model.path.name, str(profile), options, cache))
        return f"PLAN {model.sha256} {profile} {options}".encode()


def _build(onnx_path, out, gpu=H200, trt="10.3.0", **kw):
    kw.setdefault("compile_fn", FakeCompile())
    kw.setdefault("timing_cache", out / "tc.cache")
    return build_engine(onnx_path, out, target=Target(gpu, trt), progress=lambda m: None, **kw)


def test_build_writes_engine_and_manifest_then_reuses_it(onnx_dir, tmp_path):
    fake = FakeCompile()
    art, rep = _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path, preset="4k-tiles", compile_fn=fake,
                      options=BuildOptions(workspace_gb=2.0))
    assert rep.status == "built" and len(fake.calls) == 1
    assert art.path.name.startswith("nano_x2_fp16_h200-sm90_trt10.3.0_") and art.path.read_bytes().startswith(b"PLAN")
    entry = read_manifest(tmp_path)["engines"][rep.digest]
    assert entry["file"] == art.path.name and entry["key"]["precision"] == "fp16"
    assert entry["key"]["profile"] == preset_profile("4k-tiles").as_dict()
    assert entry["key"]["options"] == {"workspace_gb": 2.0, "hardware_compat": "none"}
    assert entry["onnx"]["path"] == str((onnx_dir / "nano_x2_fp16.onnx").resolve())
    assert "--stronglyTyped" in entry["trtexec"] and "--fp16" not in entry["trtexec"]
    assert "--memPoolSize=workspace:2048" in entry["trtexec"]

    again, rep2 = _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path, preset="4k-tiles", compile_fn=fake,
                         options=BuildOptions(workspace_gb=2.0))
    assert rep2.status == "up to date" and again.path == art.path and len(fake.calls) == 1
    _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path, preset="4k-tiles", compile_fn=fake,
           options=BuildOptions(workspace_gb=2.0), force=True)
    assert len(fake.calls) == 2

    art.path.write_bytes(b"tampered")
    with pytest.raises(ParagonError, match="does not match its manifest entry; use --force"):
        _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path, preset="4k-tiles", options=BuildOptions(workspace_gb=2.0))


def test_failed_check_writes_nothing(onnx_dir, tmp_path):
    def failing_check(data, model, prof, reference):
        return EngineCheck("fp16", "ref.onnx", 2, [CheckRow("astronaut 64x64", 0.1, 0.01, 20.0, True, False,
                                                            "PSNR 20 dB < 45")])

    with pytest.raises(ParagonError, match="fails its check, nothing written: astronaut 64x64: PSNR 20"):
        _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path, check=True, check_fn=failing_check)
    assert not list(tmp_path.glob("*.engine")) and read_manifest(tmp_path)["engines"] == {}


def test_check_and_build_reports_keep_their_json_shape(onnx_dir, tmp_path):
    from paragon_export.verify import LIMITS

    rows = [CheckRow("astronaut 64x64", 2e-3, 1e-4, 58.0, True, True, ""),
            CheckRow("batch of 2 64x64", 3e-3, 2e-4, 55.5, True, True, "")]
    check = EngineCheck("fp16", "ref.onnx", 2, rows)
    limits = {"max_abs": LIMITS["fp16"].max_abs, "min_psnr": LIMITS["fp16"].min_psnr}
    js = check.to_json()
    assert list(js) == ["precision", "reference", "thresholds", "scale", "rows", "passed", "worst_psnr", "worst_max_abs"]
    assert js["thresholds"] == limits and js["passed"] and (js["worst_psnr"], js["worst_max_abs"]) == (55.5, 3e-3)
    assert js["rows"][0] == {"input": "astronaut 64x64", "max_abs": 2e-3, "mean_abs": 1e-4, "psnr": 58.0,
                             "finite": True, "passed": True, "why": ""}
    art, rep = _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path, check=True, check_fn=lambda *a: check)
    assert read_manifest(tmp_path)["engines"][rep.digest]["check"] == {
        "passed": True, "worst_psnr": 55.5, "worst_max_abs": 3e-3, "reference": "ref.onnx", "thresholds": limits}
    built = rep.to_json()
    assert list(built) == ["engine", "digest", "key", "trtexec", "status", "gpu", "trt_version", "precision",
                           "precision_note", "profile", "check", "others", "build_seconds"]
    assert built["engine"] == str(art.path) and built["check"] == js and built["build_seconds"] >= 0
    text = rep.text().splitlines()
    assert text[0] == f"built: {art.path}" and text[3] == f"  {rep.trtexec}"
    assert text[4].startswith("check vs ref.onnx on ORT CPU (fp16: PSNR >= ") and text[-1].endswith("PSNR 55.50 dB  ok")
    _, again = _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path)
    assert again.status == "up to date" and "build_seconds" not in again.to_json() and again.to_json()["check"] is None


def test_ampere_plus_needs_an_ampere_gpu(onnx_dir, tmp_path):
    with pytest.raises(ParagonError, match="needs an Ampere or newer GPU"):
        _build(onnx_dir / "nano_x2_fp32.onnx", tmp_path, gpu=T4, options=BuildOptions(hardware_compat="ampere+"))
    with pytest.raises(ParagonError, match="positive number of GB"):
        _build(onnx_dir / "nano_x2_fp32.onnx", tmp_path, options=BuildOptions(workspace_gb=0))


def test_loading_on_another_gpu_refuses_and_rebuild_builds_for_it(onnx_dir, tmp_path):
    art, rep = _build(onnx_dir / "nano_x2_int8.onnx", tmp_path)
    data, entry = load_engine(art.path, target=Target(H200, "10.3.0"))
    assert data == art.path.read_bytes() and entry["key"]["precision"] == "int8"

    with pytest.raises(EngineMismatch) as e:
        load_engine(art.path, target=Target(L4, "10.3.0"))
    msg = str(e.value)
    assert "NVIDIA H200" in msg and "NVIDIA L4" in msg and f"paragon-export engine {art.path} --rebuild" in msg
    assert "\n" not in msg
    with pytest.raises(EngineMismatch, match="TensorRT 10.3.0.*TensorRT 11.1.0"):
        load_engine(art.path, target=Target(H200, "11.1.0"))

    fake = FakeCompile()
    new, rep2 = rebuild_engine(art.path, target=Target(L4, "10.3.0"), compile_fn=fake, progress=lambda m: None,
                               timing_cache=tmp_path / "tc.cache")
    assert new.path != art.path and art.path.exists() and "nvidia-l4" not in new.path.name
    assert new.path.name.startswith("nano_x2_int8_l4-sm89_trt10.3.0_")
    assert fake.calls[0][1] == rep.profile  # same profile and options as the original
    assert load_engine(new.path, target=Target(L4, "10.3.0"))[1]["key"]["gpu"] == "NVIDIA L4"
    assert len(read_manifest(tmp_path)["engines"]) == 2
    _, rep3 = _build(onnx_dir / "nano_x2_int8.onnx", tmp_path, gpu=L4)
    assert rep3.status == "up to date" and rep3.others and "NVIDIA H200" in rep3.others[0]

    new.path.write_bytes(b"truncated")
    with pytest.raises(ParagonError, match="modified or truncated"):
        load_engine(new.path, target=Target(L4, "10.3.0"))


def test_rebuild_refuses_when_the_onnx_changed_or_is_gone(onnx_dir, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes((onnx_dir / "nano_x2_fp32.onnx").read_bytes())
    out = tmp_path / "eng"
    art, _ = _build(src, out)
    src.write_bytes((onnx_dir / "nano_x2_fp16.onnx").read_bytes())
    with pytest.raises(ParagonError, match="changed since the engine was built"):
        rebuild_engine(art.path, target=Target(L4, "10.3.0"), compile_fn=FakeCompile())
    src.unlink()
    with pytest.raises(ParagonError, match="is gone"):
        rebuild_engine(art.path, target=Target(L4, "10.3.0"), compile_fn=FakeCompile())
    stray = out / "stray.engine"
    stray.write_bytes(b"x")
    with pytest.raises(ParagonError, match="has no entry in"):
        load_engine(stray, target=Target(H200, "10.3.0"))


# ---------------------------------------------------------------- trtexec

@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trtexec_is_strongly_typed_by_version(precision):
    """What compile_engine builds: strongly typed (an explicit --stronglyTyped on 10, the only mode on 11),
    TF32 off, never --fp16/--int8 (weak typing on 10, removed in 11)."""
    def flags(version):
        cmd = trtexec_command(onnx="m.onnx", engine="m.engine", input_name="input", profile=preset_profile("720p"),
                              precision=precision, options=BuildOptions(), trt_version=version)
        return [a for a in cmd.split() if a in ("--fp16", "--int8", "--noTF32", "--best", "--stronglyTyped")]

    assert flags("10.3.0") == ["--stronglyTyped", "--noTF32"]
    assert flags("11.0.0") == ["--noTF32"]


def test_trtexec_full_command():
    cmd = trtexec_command(onnx="/models/my model.onnx", engine="/out/m.engine", input_name="input",
                          profile=parse_profile("64x64:512x512:1x3x1080x1920"), precision="int8",
                          options=BuildOptions(workspace_gb=1.5, hardware_compat="ampere+"), trt_version="10.8.0",
                          timing_cache="/c/t.cache")
    assert cmd == ("trtexec '--onnx=/models/my model.onnx' --saveEngine=/out/m.engine "
                   "--minShapes=input:1x3x64x64 --optShapes=input:1x3x512x512 --maxShapes=input:1x3x1080x1920 "
                   "--stronglyTyped --noTF32 --memPoolSize=workspace:1536 --hardwareCompatibilityLevel=ampere+ "
                   "--timingCacheFile=/c/t.cache")


# ---------------------------------------------------------------- check logic (ORT stands in for the TensorRT runner)

def test_check_passes_fp16_and_catches_a_broken_model(onnx_dir, tmp_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    ref = inspect_onnx(onnx_dir / "nano_x2_fp32.onnx")
    prof = parse_profile("32x32:45x64:64x77")
    fp16 = inspect_onnx(onnx_dir / "nano_x2_fp16.onnx")
    assert find_reference(fp16).path == ref.path
    with OnnxrtRunner(SessionFromOnnx(str(fp16.path))) as a, OnnxrtRunner(SessionFromOnnx(str(ref.path))) as b:
        rep = run_check(a, fp16, b, ref, prof, "fp16")
    assert rep.passed and rep.scale == 2 and rep.worst_psnr > 60
    sizes = {r.input.split()[1] for r in rep.rows}
    assert sizes == {"64x64", "45x77"}

    m = onnx.load(str(ref.path))  # one conv weight scaled by 1.05: a subtly wrong artifact
    w = next(t for t in m.graph.initializer if len(t.dims) == 4 and t.dims[0] == 3)
    arr = onnx.numpy_helper.to_array(w) * 1.05
    w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
    onnx.save(m, str(tmp_path / "broken.onnx"))
    broken = inspect_onnx(tmp_path / "broken.onnx")
    with OnnxrtRunner(SessionFromOnnx(str(broken.path))) as a, OnnxrtRunner(SessionFromOnnx(str(ref.path))) as b:
        bad = run_check(a, broken, b, ref, prof, "fp32")
    assert not bad.passed and all(not r.passed for r in bad.rows)
    assert "max abs" in bad.rows[0].why


def test_check_engine_opens_its_reference_through_open_runner(onnx_dir, monkeypatch):
    import polygraphy.backend.trt as polygraphy_trt
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    import paragon_export.runners as runners
    from paragon_export.engines import builder, check, trt

    fp16 = inspect_onnx(onnx_dir / "nano_x2_fp16.onnx")
    # No TensorRT here: the "plan" is the fp16 ONNX's path, run by ORT where TrtRunner would run it.
    monkeypatch.setattr(trt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(builder, "deserialize", lambda _trt, data, options, onnx: data)
    monkeypatch.setattr(polygraphy_trt, "TrtRunner", lambda plan: OnnxrtRunner(SessionFromOnnx(plan)))
    opened, real = [], runners.open_runner
    monkeypatch.setattr(runners, "open_runner", lambda *a, **k: opened.append(a) or real(*a, **k))
    rep = check.check_engine(str(fp16.path), fp16, parse_profile("32x32:45x64:64x77"))
    ref = (onnx_dir / "nano_x2_fp32.onnx").resolve()
    assert opened == [(ref, "onnxruntime")] and rep.reference == str(ref)
    assert rep.passed and rep.precision == "fp16" and len(rep.rows) >= 2


def test_compare_flags_nan_and_shape():
    ref = np.zeros((1, 3, 8, 8), np.float32)
    out = ref.copy()
    out[0, 0, 0, 0] = np.nan
    assert "NaN/Inf" in verdict_row("x", out, ref, "fp16").why
    shape = verdict_row("x", ref[:, :, :4], ref, "fp32")
    assert "shape" in shape.why and shape.max_abs is None and "FAIL" in shape.text()
    assert verdict_row("x", ref + 1e-5, ref, "fp32").passed


def test_reference_discovery(onnx_dir, tmp_path):
    int8 = inspect_onnx(onnx_dir / "nano_x2_int8.onnx")
    assert find_reference(int8).path.name == "nano_x2_fp32.onnx"
    with pytest.raises(ParagonError, match="compares against fp32"):
        find_reference(int8, onnx_dir / "nano_x2_fp16.onnx")
    lone = tmp_path / "lone_fp16.onnx"
    lone.write_bytes((onnx_dir / "nano_x2_fp16.onnx").read_bytes())
    with pytest.raises(ParagonError, match="pass --reference FP32.onnx"):
        find_reference(inspect_onnx(lone))


# ---------------------------------------------------------------- GPU query

def test_parse_nvidia_smi():
    g = parse_nvidia_smi("NVIDIA H200, 9.0, 143771\n")
    assert g == GpuInfo("NVIDIA H200", (9, 0), 143771, "nvidia-smi") and g.sm == "sm90" and g.slug == "h200"
    with pytest.raises(RuntimeError, match="driver is too old"):
        parse_nvidia_smi("Tesla T4, [N/A], 15360")


def test_no_gpu_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ParagonError, match="no NVIDIA GPU found .*cuda-python not installed; nvidia-smi not found"):
        query_gpu()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ParagonError, match="CUDA_VISIBLE_DEVICES hides every device"):
        query_gpu()


# ---------------------------------------------------------------- CLI and import hygiene (subprocesses)

def _run_py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **env})


_CLI = "import sys\n{pre}\nfrom paragon_export.cli import main\nmain({args!r}, prog_name='paragon-export')\n"


def test_cli_without_tensorrt_says_how_to_install(onnx_dir, tmp_path):
    args = ["engine", str(onnx_dir / "nano_x2_fp16.onnx"), "-o", str(tmp_path / "eng")]
    r = _run_py(_CLI.format(pre="sys.modules['tensorrt'] = None  # as if not installed", args=args))
    assert r.returncode == 1
    assert r.stderr.strip() == ("Error: TensorRT is not installed: install it with `pip install "
                                "'paragon-export[trt]'` on a machine with an NVIDIA GPU and driver (engines are "
                                "built on the GPU model that will run them)")
    assert not (tmp_path / "eng" / "manifest.json").exists()


def test_cli_with_tensorrt_but_no_gpu(onnx_dir, tmp_path):
    pre = ("import types; sys.modules['tensorrt'] = types.SimpleNamespace(__version__='10.3.0'); "
           "sys.modules['cuda'] = None")
    args = ["engine", str(onnx_dir / "nano_x2_fp32.onnx"), "-o", str(tmp_path / "eng")]
    r = _run_py(_CLI.format(pre=pre, args=args), PATH=str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("Error: no NVIDIA GPU found") and "Traceback" not in r.stderr


def test_cli_rejects_bad_profile_in_one_line(onnx_dir, tmp_path):
    args = ["engine", str(onnx_dir / "nano_x2_fp32.onnx"), "-o", str(tmp_path), "--profile", "4x4:64x64:64x64"]
    r = _run_py(_CLI.format(pre="", args=args))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "minimum input 9x9" in r.stderr


def test_imports_never_pull_tensorrt_or_modelopt():
    code = (
        "import sys\n"
        "import paragon_export, engines, engines.build, engines.check, paragon_export.cli.engine\n"
        "from paragon_export.cli import main\n"
        "for argv in (['--help'], ['engine', '--help']):\n"
        "    try:\n"
        "        main(argv, prog_name='paragon-export')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'modelopt'))\n"
        "print('LOADED', bad)\n"
    )
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout and "paragon-export engine" in r.stdout


# ---------------------------------------------------------------- compile step, against a stand-in for tensorrt
# TensorRT cannot be installed here. This stand-in has only the API surface compile_engine uses, with the class,
# method and enum names of the TensorRT 10/11 Python API (tests/test_trt_contract.py checks every name against
# the real bindings of both versions), and records the calls, so the version-dependent choices are checked on CPU.

def _fake_trt(version: str, *, cache_ok=True, parse_ok=True, reject=()):
    """`cache_ok=False` rejects every non-empty timing cache; `reject` only caches with those bytes."""
    import types

    calls = []
    ten = version.startswith("10.")
    trt = types.SimpleNamespace(__version__=version, calls=calls)
    flags = ["TF32", "REFIT", "REFIT_IDENTICAL", "STRIP_PLAN", "VERSION_COMPATIBLE"] + (["FP16", "INT8"] if ten else [])
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1 if ten else 0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")

    class Logger:
        WARNING = 2

        def __init__(self, min_severity):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class ITimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return b"CACHE+" + self.blob

    class IBuilderConfig:
        progress_monitor = None
        hardware_compatibility_level = None

        def set_memory_pool_limit(self, pool, pool_size):
            calls.append(("set_memory_pool_limit", pool, pool_size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))

        def create_timing_cache(self, serialized_timing_cache):
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.blob))
            ok = (cache_ok or not cache.blob) and cache.blob not in reject
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self):
            return self.cache

    class IOptimizationProfile:
        def set_shape(self, input, min, opt, max):
            calls.append(("set_shape", input, min, opt, max))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            self.config = IBuilderConfig()
            return self.config

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            mon = config.progress_monitor
            mon.phase_start("Building engine", None, 2)
            mon.phase_start("Tactic selection", "Building engine", 3)
            assert mon.step_complete("Tactic selection", 0) is True
            mon.phase_finish("Tactic selection")
            mon.phase_finish("Building engine")
            calls.append(("build", config.hardware_compatibility_level))
            return b"PLAN"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, model):
            return parse_ok

        def get_error(self, index):
            return "In node 3 (Conv): unsupported"

    class Runtime:
        engine_host_code_allowed = False

        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, serialized_engine):
            calls.append(("deserialize", self.engine_host_code_allowed))
            return ICudaEngine() if serialized_engine.startswith(b"PLAN") else None

    class ICudaEngine:
        def serialize(self):
            return b"PLAN refitted"

    class Refitter:
        def __init__(self, engine, logger):
            pass

        def refit_cuda_engine(self):
            calls.append(("refit_cuda_engine",))
            return True

    class OnnxParserRefitter:
        num_errors = 0

        def __init__(self, refitter, logger):
            pass

        def refit_from_file(self, model):
            calls.append(("refit_from_file", Path(model).name))
            return True

        def get_error(self, index):
            return ""

    for cls in (Logger, IProgressMonitor, ITimingCache, IBuilderConfig, IOptimizationProfile, Builder, OnnxParser,
                Runtime, ICudaEngine, Refitter, OnnxParserRefitter):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.mark.parametrize("version, strongly_typed_bit", [("10.3.0", 1), ("11.0.0", 0)])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_compile_engine_is_strongly_typed_on_every_version(onnx_dir, tmp_path, version, strongly_typed_bit,
                                                           precision):
    """No FP16/INT8 flag even where TensorRT 10 has them (a weakly typed build may run our fp32-kept nodes in
    fp16); the network is created with the STRONGLY_TYPED bit, whose index differs between 10 and 11."""
    from paragon_export.engines.builder import compile_engine

    trt = _fake_trt(version)
    model = inspect_onnx(onnx_dir / f"nano_x2_{precision}.onnx")
    echoed = []
    plan = compile_engine(trt, model, preset_profile("720p"), BuildOptions(workspace_gb=1.0, hardware_compat="ampere+"),
                          timing_cache=tmp_path / "t.cache", fallback_cache=tmp_path / "f.cache", progress=echoed.append)
    assert plan == b"PLAN"
    assert [c for c in trt.calls if c[0] == "set_flag"] == []
    assert [c for c in trt.calls if c[0] == "clear_flag"] == [("clear_flag", "TF32")]
    assert [c for c in trt.calls if c[0] == "create_network"] == [("create_network", 1 << strongly_typed_bit)]
    assert ("set_shape", "input", (1, 3, 64, 64), (1, 3, 720, 1280), (1, 3, 1280, 1280)) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 30) in trt.calls and ("build", "AMPERE_PLUS") in trt.calls
    assert (tmp_path / "t.cache").read_bytes() == b"CACHE+"  # empty cache created, then persisted
    assert any(e.startswith("Building engine (2 steps)") for e in echoed)
    assert any(e.startswith("  Tactic selection done in") for e in echoed)


def test_compile_engine_timing_cache_reuse_and_mismatch(onnx_dir, tmp_path):
    from paragon_export.engines.builder import compile_engine

    model = inspect_onnx(onnx_dir / "nano_x2_fp32.onnx")
    cache, fallback = tmp_path / "t.cache", tmp_path / "f.cache"
    cache.write_bytes(b"old")
    trt = _fake_trt("11.0.0")
    msgs = []
    compile_engine(trt, model, preset_profile("720p"), BuildOptions(), timing_cache=cache, fallback_cache=fallback,
                   progress=msgs.append)
    assert ("set_timing_cache", b"old") in trt.calls and cache.read_bytes() == b"CACHE+old"
    assert any("reusing" in m for m in msgs)

    trt = _fake_trt("11.0.0", cache_ok=False)  # both caches from another GPU: a fresh one replaces the default
    fallback.write_bytes(b"stale")
    compile_engine(trt, model, preset_profile("720p"), BuildOptions(), timing_cache=cache, fallback_cache=fallback,
                   progress=msgs.append)
    assert cache.read_bytes() == b"CACHE+old" and fallback.read_bytes() == b"CACHE+"

    with pytest.raises(ParagonError, match=r"cannot parse nano_x2_fp32.onnx: In node 3 \(Conv\): unsupported"):
        compile_engine(_fake_trt("10.3.0", parse_ok=False), model, preset_profile("720p"), BuildOptions(),
                       timing_cache=cache, fallback_cache=fallback, progress=msgs.append)


def test_rejected_timing_cache_keeps_the_default_cache(onnx_dir, tmp_path):
    """A --timing-cache TensorRT rejects must not cost the good default per-GPU cache: the default is used
    (and extended), not overwritten by a fresh, empty one."""
    from paragon_export.engines.builder import compile_engine

    model = inspect_onnx(onnx_dir / "nano_x2_fp32.onnx")
    given, default = tmp_path / "foreign.cache", tmp_path / "default.cache"
    given.write_bytes(b"foreign")
    default.write_bytes(b"good")
    trt = _fake_trt("10.13.0", reject={b"foreign"})
    msgs = []
    compile_engine(trt, model, preset_profile("720p"), BuildOptions(), timing_cache=given, fallback_cache=default,
                   progress=msgs.append)
    assert given.read_bytes() == b"foreign"  # left as it was
    assert default.read_bytes() == b"CACHE+good"  # the good cache was loaded and saved back, not replaced
    assert ("set_timing_cache", b"good") in trt.calls
    assert any("foreign.cache was written by another GPU" in m for m in msgs)


def test_verify_engine_loads_through_the_runtime(onnx_dir, tmp_path):
    from paragon_export.engines import verify_engine

    art, _ = _build(onnx_dir / "nano_x2_fp32.onnx", tmp_path)
    here = Target(H200, "10.3.0", trt=_fake_trt("10.3.0"))
    entry, report = verify_engine(art.path, target=here)
    assert entry["file"] == art.path.name and report is None
    with pytest.raises(EngineMismatch):
        verify_engine(art.path, target=Target(L4, "10.3.0", trt=_fake_trt("10.3.0")))
    # a plan the runtime rejects even though the manifest matches (bytes and sha256 rewritten consistently)
    from paragon_export.artifact import sha256_file

    art.path.write_bytes(b"JUNK")
    digest, entry = entry_for_file(tmp_path, art.path.name)
    put_entry(tmp_path, digest, {**entry, "engine_sha256": sha256_file(art.path)})
    with pytest.raises(ParagonError, match="could not deserialize"):
        verify_engine(art.path, target=here)


# ---------------------------------------------------------------- engines in bench / upscale (runners.trt_runner)

def test_bench_reads_engine_precision_from_the_manifest_key(onnx_dir, tmp_path):
    from paragon_export.runners import engine_precision

    art, _ = _build(onnx_dir / "nano_x2_int8.onnx", tmp_path)
    assert engine_precision(art.path) == ("int8", "engine manifest")  # bench's precision column reads this
    stray = tmp_path / "stray.engine"
    stray.write_bytes(b"x")
    assert engine_precision(stray)[1] != "engine manifest"


# TensorRT "imports" and a GPU "exists", but this machine is an L4 where the engine was built on an H200.
_ON_AN_L4 = ("import paragon_export.runners as r, paragon_export.engines.load as b\n"
             "from paragon_export.engines import GpuInfo\n"
             "r.tensorrt_unavailable = lambda: None\n"
             "b.current_target = lambda: b.Target(GpuInfo('NVIDIA L4', (8, 9)), '10.3.0')")


def test_bench_skips_a_foreign_engine_with_the_rebuild_hint(onnx_dir, tmp_path):
    art, _ = _build(onnx_dir / "nano_x2_fp16.onnx", tmp_path / "eng")
    stray = tmp_path / "eng" / "trtexec-built.engine"  # no manifest entry: TensorRT itself refuses it
    stray.write_bytes(b"not a plan")
    args = ["bench", str(art.path), str(stray), "--runs", "1", "--warmup", "0", "--threads", "1"]
    r = _run_py(_CLI.format(pre=_ON_AN_L4, args=args))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    foreign = next(ln for ln in lines if ln.startswith(f"skipped {art.path} at 256x256: "))
    assert "NVIDIA H200" in foreign and "NVIDIA L4" in foreign
    assert f"`paragon-export engine {art.path} --rebuild`" in foreign
    refused = next(ln for ln in lines if ln.startswith(f"skipped {stray} at 256x256: TensorRT cannot load"))
    assert f"`paragon-export engine {stray} --rebuild`" in refused


def test_upscale_with_a_foreign_engine_is_one_skipped_line(onnx_dir, tmp_path):
    from paragon_export.images import sample_photo_paths

    art, _ = _build(onnx_dir / "nano_x2_fp32.onnx", tmp_path / "eng")
    args = ["upscale", str(art.path), str(sample_photo_paths("eval")[0]), "-o", str(tmp_path / "out")]
    r = _run_py(_CLI.format(pre=_ON_AN_L4, args=args))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"Error: skipped {art.path}: refusing to load")
    assert "--rebuild" in r.stderr and not (tmp_path / "out").exists()


def test_engine_runner_fills_the_profile_min_batch(tmp_path):
    """An engine whose profile starts at batch 2 gets tiles of one image: pad with copies, return ours."""
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    from paragon_export.upscale import ModelRunner, upscale_array

    class Engine:
        def get_tensor_profile_shape(self, name, profile_index):
            return [(2, 3, 16, 16), (2, 3, 64, 64), (4, 3, 64, 64)]

    class FakeTrtRunner:  # the part of Polygraphy's TrtRunner ModelRunner uses
        context = type("Context", (), {"engine": Engine()})()

        def activate(self):
            pass

        def deactivate(self):
            pass

        def get_input_metadata(self, use_numpy_dtypes=True):
            return TensorMetadata().add("input", DataType.FLOAT32, (-1, 3, -1, -1))

        def infer(self, feed):
            x = feed["input"]
            assert 2 <= x.shape[0] <= 4 and 16 <= min(x.shape[2:]) and max(x.shape[2:]) <= 64, x.shape
            return {"output": x.repeat(2, axis=2).repeat(2, axis=3)}

    img = np.random.default_rng(0).random((40, 70, 3), dtype=np.float32)
    with ModelRunner(FakeTrtRunner(), "tensorrt", tmp_path / "m.engine") as model:
        assert model.scale == 2 and model.min_batch == 2 and model.max_hw == (64, 64)
        out = upscale_array(model, img, scale=2, tile=32, overlap=4, min_hw=model.min_hw, max_hw=model.max_hw)
    np.testing.assert_allclose(out, img.repeat(2, 0).repeat(2, 1), atol=1e-6)


def test_trt_extra_brings_what_polygraphy_needs_to_find_cuda():
    """Polygraphy < 0.53.4 does not find pip's CUDA runtime wheel: every TensorRT run on a pip-only machine
    failed with "Could not find the CUDA runtime library"."""
    import tomllib

    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trt"]
    reqs = {r.name: r for r in map(Requirement, extra)}
    assert {"tensorrt", "nvidia-cuda-runtime", "polygraphy"} <= set(reqs)
    assert "0.53.4" in reqs["polygraphy"].specifier and "0.53.3" not in reqs["polygraphy"].specifier


def test_gpu_smoke_script_needs_only_the_package_and_uses_our_int8_recipe():
    """tests/gpu/smoke.py runs on a GPU box with only `[trt]` installed: no pytest, no conftest; its int8
    model comes from our recipe (plain quantize_static output fails our int8 check and TensorRT's
    IDequantizeLayer, which takes no int32 bias). Checked on the source: running it takes minutes of CPU
    (it did pass trt_blockers == [] when run by hand)."""
    import ast

    tree = ast.parse((ROOT / "tests" / "gpu" / "smoke.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"pytest", "conftest"}, imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "quantize_int8" in names and "quantize_static" not in names
    r = _run_py("import sys, runpy; sys.modules['pytest'] = sys.modules['conftest'] = None\n"
                f"g = runpy.run_path({str(ROOT / 'tests' / 'gpu' / 'smoke.py')!r}, run_name='smoke')\n"
                "print(sorted(k for k in g if k in ('export_models', 'main', 'time_engine')))")
    assert r.returncode == 0 and "['export_models', 'main', 'time_engine']" in r.stdout, r.stderr


# ---------------------------------------------------------------- engines users can carry (refit, version-compatible, stripped)

def test_new_build_options_keep_existing_keys_and_change_the_digest():
    assert BuildOptions().as_dict() == {"workspace_gb": None, "hardware_compat": "none"}  # old manifests still match
    keys = [_key(options=BuildOptions(**{opt: True})) for opt in ("refittable", "version_compatible", "strip_weights")]
    assert len({k.digest for k in keys} | {_key().digest}) == 4
    for k in keys:
        assert type(k).from_dict(json.loads(json.dumps(k.as_dict()))) == k


def test_version_compatible_engines_load_in_later_trt_of_the_same_major():
    vc = _key(trt="10.3.0", options=BuildOptions(version_compatible=True))
    assert incompatibility(vc, H200, "10.13.0.35") is None
    assert "same major" in incompatibility(vc, H200, "10.2.0")
    assert "same major" in incompatibility(vc, H200, "11.4.0.106")
    assert "NVIDIA L4" in incompatibility(vc, L4, "10.13.0.35")  # still one GPU model without ampere+


@pytest.mark.parametrize("options, flags, trtexec", [
    (BuildOptions(refittable=True), ["REFIT"], ["--refit"]),
    (BuildOptions(strip_weights=True), ["STRIP_PLAN", "REFIT_IDENTICAL"], ["--stripWeights"]),
    (BuildOptions(refittable=True, strip_weights=True), ["REFIT", "STRIP_PLAN"], ["--refit", "--stripWeights"]),
    (BuildOptions(version_compatible=True), ["VERSION_COMPATIBLE"], ["--versionCompatible"]),
])
def test_carry_options_set_their_builder_flags_and_trtexec_flags(onnx_dir, tmp_path, options, flags, trtexec):
    from paragon_export.engines.builder import compile_engine

    for version in ("10.13.0", "11.4.0"):
        trt = _fake_trt(version)
        compile_engine(trt, inspect_onnx(onnx_dir / "nano_x2_fp16.onnx"), preset_profile("720p"), options,
                       timing_cache=tmp_path / "t.cache", fallback_cache=tmp_path / "f.cache", progress=lambda m: None)
        assert [c[1] for c in trt.calls if c[0] == "set_flag"] == flags
        cmd = trtexec_command(onnx="m.onnx", engine="m.engine", input_name="input", profile=preset_profile("720p"),
                              precision="fp16", options=options, trt_version=version)
        assert [a for a in cmd.split() if a in ("--refit", "--stripWeights", "--versionCompatible")] == trtexec


def test_loading_allows_the_lean_runtime_and_refits_stripped_plans(onnx_dir, tmp_path):
    from paragon_export.engines.builder import deserialize

    trt = _fake_trt("10.13.0")
    deserialize(trt, b"PLAN", BuildOptions(version_compatible=True, strip_weights=True),
                onnx_dir / "nano_x2_fp16.onnx")
    assert trt.calls == [("deserialize", True), ("refit_from_file", "nano_x2_fp16.onnx"), ("refit_cuda_engine",)]
    with pytest.raises(ParagonError, match="which is gone"):
        deserialize(_fake_trt("11.4.0"), b"PLAN", BuildOptions(strip_weights=True), tmp_path / "moved.onnx")


def test_print_trtexec_needs_no_tensorrt(onnx_dir, tmp_path):
    args = ["engine", str(onnx_dir / "nano_x2_int8.onnx"), "--print-trtexec", "--trt-version", "10.13.0.35",
            "--preset", "4k-tiles", "--refittable", "-o", str(tmp_path)]
    r = _run_py(_CLI.format(pre="sys.modules['tensorrt'] = None", args=args))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"trtexec --onnx={onnx_dir / 'nano_x2_int8.onnx'} --saveEngine={tmp_path}/nano_x2_int8.engine "
                                "--minShapes=input:1x3x64x64 --optShapes=input:4x3x512x512 --maxShapes=input:4x3x576x576 "
                                "--stronglyTyped --noTF32 --refit")
    r = _run_py(_CLI.format(pre="", args=args[:2] + ["--print-trtexec", "--trt-version", "8.6.1"]))
    assert r.returncode == 1 and r.stderr.strip() == ("Error: --trt-version 8.6.1: paragon-export engines need "
                                                      "TensorRT 10 or newer")


def _refit_target():
    return Target(H200, "10.3.0", trt=_fake_trt("10.3.0"))


def _reweighted(src: Path, dst: Path, factor: float = 1.05) -> Path:
    """The same graph with every conv weight scaled: what fine-tuning gives."""
    m = onnx.load(str(src))
    for t in m.graph.initializer:
        if len(t.dims) == 4 and t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * factor, t.name))
    onnx.save(m, str(dst))
    return dst


def test_refit_writes_a_refitted_engine_of_the_new_onnx(onnx_dir, tmp_path):
    from paragon_export.engines.refit import refit_engine

    art, _ = _build(onnx_dir / "nano_x2_fp32.onnx", tmp_path / "eng", options=BuildOptions(refittable=True))
    tuned = _reweighted(onnx_dir / "nano_x2_fp32.onnx", tmp_path / "tuned_fp32.onnx")
    target = _refit_target()
    said = []
    new = refit_engine(art.path, tuned, target=target, progress=said.append)
    assert new.path != art.path and art.path.exists() and said[-1].startswith(f"refitted {art.path.name} with")
    assert new.path.read_bytes() == b"PLAN refitted" and new.path.name.startswith("tuned_fp32_h200-sm90_trt10.3.0_")
    assert ("refit_from_file", "tuned_fp32.onnx") in target.trt.calls
    entry = entry_for_file(tmp_path / "eng", new.path.name)[1]
    assert entry["refitted_from"] == art.path.name and entry["key"]["options"]["refittable"] is True
    assert load_engine(new.path, target=target)[0] == b"PLAN refitted"  # sha256 and key recorded right


def test_refit_refuses_what_a_refit_cannot_do(onnx_dir, tmp_path):
    from paragon_export.engines.refit import refit_engine

    plain = _build(onnx_dir / "nano_x2_fp32.onnx", tmp_path / "a")[0].path
    with pytest.raises(ParagonError, match="was not built refittable"):
        refit_engine(plain, onnx_dir / "nano_x2_fp32.onnx", target=_refit_target())
    art, _ = _build(onnx_dir / "nano_x2_fp32.onnx", tmp_path / "b", options=BuildOptions(refittable=True))
    with pytest.raises(ParagonError, match="is int8 with input 'input'; the engine is fp32"):
        refit_engine(art.path, onnx_dir / "nano_x2_int8.onnx", target=_refit_target())
    m = onnx.load(str(onnx_dir / "nano_x2_fp32.onnx"))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))
    onnx.save(m, str(tmp_path / "other.onnx"))
    with pytest.raises(ParagonError, match=r"graphs differ at node \d+ .*rebuild instead"):
        refit_engine(art.path, tmp_path / "other.onnx", target=_refit_target())
    with pytest.raises(ParagonError, match="takes the fine-tuned model as ONNX"):
        refit_engine(art.path, tmp_path / "x.safetensors", target=_refit_target())
