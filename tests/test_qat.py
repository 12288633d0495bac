"""qat: ModelOpt fake quantization, fine-tuning, resume, Q/DQ export and ORT agreement on real photos."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import make_model, write_model
from paragon_export.images import load_image, sample_photo_paths, save_image
from paragon_export.metrics import psnr
from paragon_export.qat_report import QATReport, json_default

CALIB = {"lr_size": (16, 16), "eval_size": (32, 32), "crops_per_image": 1, "batch_size": 2}
SIZES = ((32, 32), (27, 45))  # LR; the second is non-square and not a multiple of 8


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight real photos, centre-cropped to 96x128 so that decoding them is quick."""
    d = tmp_path_factory.mktemp("photos")
    for p in sample_photo_paths("all")[::2]:
        img = load_image(p)
        h, w = img.shape[:2]
        save_image(img[h // 2 - 48:h // 2 + 48, w // 2 - 64:w // 2 + 64], d / f"{p.stem}.png")
    return d


@pytest.fixture(scope="module")
def calib(photos):
    from paragon_export.calibration import build_calibration_set

    return build_calibration_set(photos, scale=2, **CALIB)


@pytest.fixture(scope="module")
def patches(photos, calib):
    from paragon_export.qat_data import calibration_image_paths, train_patches

    return train_patches(calibration_image_paths(photos, calib.calib_images), scale=2, patch=16, seed=0)


def _run(calib, settings, seed=0):
    from paragon_export.qat_run import QATRun

    return QATRun.create(make_model(fused=True, seed=seed), calib.forward_loop, settings, 2)


def test_import_and_help_do_not_load_modelopt():
    code = (
        "import sys, paragon_export, paragon_export.qat, paragon_export.cli.qat\n"
        "from click.testing import CliRunner\n"
        "from paragon_export.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0 and 'qat' in r.output, r.output\n"
        "r = CliRunner().invoke(main, ['qat', '--help'])\n"
        "assert r.exit_code == 0 and '--resume' in r.output, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('modelopt', 'tensorrt')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("upsampler", ["mks2021", "legacy"])
def test_magic_quantizers_disabled_are_exact_and_enabled_quantize(upsampler):
    from paragon_export.qat_quant import quantize, quantizers

    base = make_model(fused=True, upsampler=upsampler)
    x = torch.from_numpy(load_image(sample_photo_paths("eval")[0])[100:124, 100:140].transpose(2, 0, 1).copy())[None]
    floaty = quantize(copy.deepcopy(base), lambda m: m(x), magic="float")
    q8 = quantize(copy.deepcopy(base), lambda m: m(x), magic="int8")
    magic_q = [n for n in quantizers(q8) if n.startswith("magic_upsampler.")]
    assert len(magic_q) == 6
    assert not [n for n in quantizers(floaty) if n.startswith("magic_upsampler.")]
    # With the rest of the network disabled too, the quantized upsampler is the original op for op.
    for q in quantizers(floaty).values():
        q.disable()
    with torch.no_grad():
        assert torch.equal(floaty(x), base(x))
        only_magic = copy.deepcopy(q8)
        for n, q in quantizers(only_magic).items():
            if not n.startswith("magic_upsampler."):
                q.disable()
        diff = (only_magic(x) - base(x)).abs().max().item()
    assert 1e-5 < diff < 0.1


def test_short_qat_reduces_distillation_loss(calib, patches):
    from paragon_export.qat_recipe import QATRecipe

    run = _run(calib, QATRecipe(steps=40, lr=2e-5, batch=4, patch=16))
    probe = torch.from_numpy(np.concatenate([calib.batch(i) for i in range(len(calib))]))
    before = run.distill_loss(probe)
    teacher_before = {k: v.clone() for k, v in run.teacher.state_dict().items()}
    losses = [run.train_step(patches) for _ in range(40)]
    after = run.distill_loss(probe)
    assert run.step == 40
    # Most of the gap is activation rounding noise that no weight can remove; the rest goes.
    assert after < 0.98 * before, (before, after, losses)
    # The teacher is a frozen copy: training the student never touches it.
    assert all(torch.equal(v, run.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_resume_matches_an_uninterrupted_run(calib, patches, tmp_path):
    from paragon_export.qat_recipe import QATRecipe
    from paragon_export.qat_run import QATRun, read_state, save_state

    settings = QATRecipe(steps=5, lr=5e-4, batch=2, patch=16)
    straight = _run(calib, settings)
    for _ in range(5):
        straight.train_step(patches)
    first = _run(calib, settings)
    for _ in range(3):
        first.train_step(patches)
    save_state(first, tmp_path, {"note": "test"})
    doc, tensors = read_state(tmp_path)
    assert doc["step"] == 3 and doc["note"] == "test"
    assert any(k.startswith("adam.exp_avg_sq.") for k in tensors)
    assert any(k.endswith("input_quantizer._amax") for k in tensors)
    # Rebuilt as `qat --resume` does: calibrated on one batch only (other amax), then loaded.
    one = torch.from_numpy(calib.batch(0))
    resumed = QATRun.create(make_model(fused=True), lambda m: m(one), settings, 2)
    assert not torch.equal(resumed.student.conv_in.input_quantizer.amax, first.student.conv_in.input_quantizer.amax)
    resumed.load_tensors(tensors)
    resumed.step = doc["step"]
    for _ in range(2):
        resumed.train_step(patches)
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-6


def test_qdq_export_symmetric_per_channel_and_ort_agrees(calib):
    from paragon_export.verify import run_torch, verification_inputs
    from paragon_export.onnx_graph import io_dims, ort_session, run_session
    from paragon_export.qat_recipe import QATRecipe
    from paragon_export.qat_export import export_qdq, verify_qdq

    run = _run(calib, QATRecipe(magic="int8"))
    graph, info = export_qdq(run.student)
    checks = info.checks
    assert checks["q_nodes"] > 0 and checks["q_nodes"] == checks["dq_nodes"]
    assert checks["zero_points_all_zero"] and checks["zero_point_types"] == ["int8"]
    assert checks["weights_per_channel"] and not info.trt_blockers
    assert "checks" not in info.to_json()  # the report's checks are of the shipped graph
    assert not checks["float_nodes"]  # magic="int8": the Magic ConvTranspose/Convs are quantized too
    assert "ConvTranspose" in checks["op_counts"]
    assert io_dims(graph)["input"][2:] == ["height", "width"]
    report = verify_qdq(graph, run.student, 2, SIZES)
    assert set(report.groups) >= {"32x32", "27x45"}
    assert report.min_psnr > 45 and report.max_abs < 0.05
    # ORT reproduces the fake-quant model, not the fp32 one it was made from.
    sess = ort_session(graph)
    for group, _, x in verification_inputs(2, SIZES)[:2]:
        y = run_session(sess, x)
        assert psnr(y, run_torch(run.student, x)) > psnr(y, run_torch(run.teacher, x)) + 5


def test_cli_interrupt_then_resume(photos, tmp_path, monkeypatch):
    from paragon_export import qat as qat_mod
    from paragon_export.cli import main

    ckpt = write_model(tmp_path / "nano.safetensors", fused=True)
    out = tmp_path / "qat"
    args = ["qat", str(ckpt), "--data", str(photos), "-o", str(out), "--steps", "4", "--batch", "2",
            "--patch", "16", "--crop", "16x16", "--eval-size", "32x32", "--eval-every", "2", "--save-every", "2",
            "--no-ptq"]
    monkeypatch.setattr(qat_mod, "VERIFY_SIZES", SIZES)
    real_step = qat_mod.QATRun.train_step

    def interrupted(self, patches):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, patches)

    monkeypatch.setattr(qat_mod.QATRun, "train_step", interrupted)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "interrupted at step 3/4" in r.output, r.output
    assert json.loads((out / "qat_state.json").read_text())["step"] == 3
    assert not list(out.glob("*.onnx"))  # nothing half-done is written

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "--resume" in r.output  # a saved run is not silently restarted

    monkeypatch.setattr(qat_mod.QATRun, "train_step", real_step)
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "qat_report.json").read_text())
    report = QATReport.from_json(doc)
    assert report.to_json() == doc  # read back whole
    t = report.training
    assert (t.resumed_from, t.steps, t.steps_this_run) == (3, 4, 1)
    # The saved history (steps 0 and 2) comes back from qat_state.json with the resumed run's step 4.
    assert [h.step for h in t.history] == [0, 2, 4] and t.history[0].distill_l1 is None
    assert all(h.heldout_y_psnr > 0 for h in t.history)
    assert report.checks["zero_points_all_zero"] and report.checks["weights_per_channel"]
    # Full int8 but for the convs TensorRT has no int8 kernel for, which run fp16
    rec = report.recipe
    assert rec.magic_filters == "int8" and set(report.checks["float_nodes"]) == set(rec.trt_excluded)
    assert rec.mac_share["int8"] >= 0.9 and rec.mac_share["fp32"] == 0 and rec.remainder["dtype"] == "fp16"
    assert abs(sum(rec.mac_share.values()) - 1) < 1e-6
    assert report.verification.min_psnr > 40
    q = report.quality
    assert q.ptq_int8 is None and report.ptq is None and "ptq_int8" not in report.latency.median_ms  # --no-ptq
    assert q.qat_int8.mean.y_psnr_drop == pytest.approx(q.fp32.mean.y_psnr - q.qat_int8.mean.y_psnr)
    assert report.table() in r.output  # what the command printed, rebuilt from the file
    assert "QAT int8 (4 steps)" in r.output
    md = report.markdown().splitlines()
    assert md[0] == "| model | Y-PSNR | SSIM | PSNR/fp32 | ms | x fp32 | Q/DQ | float | TensorRT |" and len(md[1].split("|")) == 11
    assert any(m.startswith(f"| QAT int8 (4 steps) | {q.qat_int8.mean.y_psnr:.3f} | {q.qat_int8.mean.ssim:.4f} |")
               for m in md)
    assert any(m.startswith("- held-out: ") for m in md)
    onnx_files = list(out.glob("*_int8_qat_op19.onnx"))
    assert len(onnx_files) == 1 and report.output.model == str(onnx_files[0])


def test_cli_errors(photos, tmp_path):
    from paragon_export.cli import main

    ckpt = write_model(tmp_path / "nano.safetensors", fused=True)
    r = CliRunner().invoke(main, ["qat", str(ckpt), "--data", str(photos), "-o", str(tmp_path / "o"), "--resume",
                                  "--crop", "16x16"])
    assert r.exit_code == 1 and "no saved QAT state" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["qat", str(ckpt), "--data", str(photos), "-o", str(tmp_path / "o"), "--lr", "-1"])
    assert r.exit_code == 1 and "lr > 0" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["qat", str(ckpt), "--data", str(empty), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "holds no images" in r.output


@pytest.mark.parametrize("upsampler", ["mks2021", "legacy"])
def test_onnx_node_names_map_to_every_quantizer(upsampler, tmp_path, calib):
    """QAT keeps in float the layers PTQ kept in float, named by ONNX node: the mapping must reach
    every conv of the real FP32 export, each to its own quantizers."""
    import onnx

    from paragon_export.export_onnx import export_model
    from paragon_export.qat_recipe import QATRecipe
    from paragon_export.qat_run import QATRun
    from paragon_export.qat_quant import quantizers, quantizers_for_nodes

    fused = make_model(fused=True, upsampler=upsampler)
    path = tmp_path / "fp32.onnx"
    export_model(fused, path, meta={"scale": "2"}, verify_sizes=((16, 16),))
    nodes = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
    names, unmatched = quantizers_for_nodes(fused, nodes)
    assert not unmatched and len(names) == 2 * len(nodes) == len(set(names))
    run = QATRun.create(fused, lambda m: m(torch.from_numpy(calib.batch(0))), QATRecipe(magic="int8"), 2,
                        keep_float=names[:4])
    assert set(quantizers(run.student)) == set(names[4:])


@pytest.mark.parametrize("model", [
    dict(scale=1), dict(scale=3),
    dict(variant="paragonsr2_tiny", upsampler="legacy"),  # traiNNer-redux's layout, fused
], ids=["nano_x1", "nano_x3", "tiny_x2_legacy"])
def test_qat_writes_its_artifact_for_other_checkpoints(model, photos, tmp_path):
    """Issue 18 item 2: the export check compared the fp16-remainder file with the fp32 fake-quant
    student (tiny x2: 38 dB against a 40 dB limit). The export is now checked before the remainder,
    whose own effect is measured apart."""
    from paragon_export.qat import qat
    from paragon_export.qat_recipe import QATRecipe

    ckpt = write_model(tmp_path / "m.safetensors", fused=True, **model)
    recipe = QATRecipe(steps=2, batch=2, patch=16, eval_every=2, save_every=2, lr_size=(16, 16), eval_size=(32, 32))
    art, report = qat(ckpt, tmp_path / "out", recipe, data_dir=photos, ptq_baseline=False, bar=False,
                      verify_sizes=SIZES)
    v = report.verification
    assert art.path.is_file() and v.min_psnr >= v.min_psnr_limit
    assert report.recipe.remainder["dtype"] == "fp16" and v.remainder.min_psnr >= v.remainder_min_psnr_limit
    _assert_written_as_before(report, art, tmp_path / "out" / "qat_report.json")


def test_diverged_training_is_named_as_such(photos, tmp_path):
    # Issue 18 item 8: qat --lr 1e6 was reported as an export mismatch (or wrote a broken file).
    from paragon_export.errors import ParagonError
    from paragon_export.qat import qat
    from paragon_export.qat_recipe import QATRecipe

    ckpt = write_model(tmp_path / "m.safetensors", fused=True)
    with pytest.raises(ParagonError, match=r"QAT diverged at step \d: distillation loss .*lower --lr \(it is 1e\+06\)"):
        qat(ckpt, tmp_path / "out", QATRecipe(steps=3, lr=1e6, batch=2, patch=16, lr_size=(16, 16), eval_size=(32, 32)),
            data_dir=photos, ptq_baseline=False, bar=False, verify_sizes=SIZES)
    assert not list((tmp_path / "out").glob("*.onnx"))


# qat_report.json's schema as readers know it (issue 15 typed the report; the file stays the same).
REPORT_KEYS = {
    None: ["command", "model", "calibration", "recipe", "checks", "export", "training", "verification",
           "native_kernels", "quality", "ptq", "latency", "wall_seconds", "output"],
    "model": ["source", "source_sha256", "variant", "scale", "upsampler", "fusion"],
    "recipe": ["tool", "format", "calibrator", "activations", "weights", "bias", "quantized_ops", "output_quantization",
               "magic_filters", "trt_excluded", "remainder", "mac_share", "float_quantizers", "unmatched_float_nodes",
               "trt_compatible", "options"],
    "export": ["nodes_before", "nodes_after", "simplify", "per_channel_rewritten", "trt_blockers"],
    "training": ["steps", "resumed_from", "steps_this_run", "train_seconds", "seconds_per_step", "lr", "schedule",
                 "batch", "patch", "gt_weight", "loss", "train_patches", "history"],
    "verification": ["groups", "max_abs", "min_psnr", "remainder", "min_psnr_limit", "reference",
                     "remainder_min_psnr_limit", "runtime"],
    "quality": ["fp32", "ptq_modelopt", "qat_torch", "qat_int8"],
    "latency": ["threads", "input", "repeats", "median_ms", "ratio_vs_fp32"],
    "output": ["model", "sha256", "report"],
}


def _assert_written_as_before(report, art, path):
    """The file on disk is `to_json()` and has the keys (in order) it had before the report was typed;
    the artifact's meta is the same document plus the ONNX metadata."""
    doc = json.loads(path.read_text())
    assert doc == json.loads(json.dumps(report.to_json(), default=json_default))
    assert {k: v for k, v in art.meta.items() if k != "metadata"} == report.to_json()
    for part, keys in REPORT_KEYS.items():
        assert list(doc if part is None else doc[part]) == keys, part
    assert list(doc["quality"]["qat_int8"]) == ["mean", "images"]
    assert list(doc["quality"]["qat_int8"]["mean"]) == ["psnr_vs_fp32", "y_psnr", "ssim", "y_psnr_drop"]
    assert list(doc["quality"]["fp32"]["images"][0]) == ["image", "lr", "psnr_vs_fp32", "y_psnr", "ssim"]
    assert [list(h) for h in doc["training"]["history"]] == [["step", "distill_l1", "heldout_y_psnr"]] * 2
    assert doc["command"] == "qat" and doc["ptq"] is None and doc["training"]["history"][0]["distill_l1"] is None
    # the file records the model's minimum input (its band convs), as the graph's widest conv says
    from paragon_export.engines.onnx_info import min_input_hw

    h, w = min_input_hw(onnx.load(str(art.path)), {})
    assert art.meta["metadata"]["min_size"] == f"{h}x{w}" and h > 3


def test_quality_means_drop_and_json():
    from paragon_export.int8_eval import ImageScore, Quality

    no_hr = Quality.of([ImageScore("a", [4, 4], psnr_vs_fp32=40.0), ImageScore("b", [4, 6], psnr_vs_fp32=50.0)])
    assert no_hr.to_json() == {"mean": {"psnr_vs_fp32": 45.0},  # absent figures are left out, not null
                               "images": [{"image": "a", "lr": [4, 4], "psnr_vs_fp32": 40.0},
                                          {"image": "b", "lr": [4, 6], "psnr_vs_fp32": 50.0}]}
    fp32 = Quality.of([ImageScore("a", [4, 4], y_psnr=30.0, ssim=0.9)])
    q = Quality.of([ImageScore("a", [4, 4], psnr_vs_fp32=44.0, y_psnr=29.75, ssim=0.8)])
    assert q.with_drop(fp32).mean.y_psnr_drop == 0.25 and q.mean.y_psnr_drop is None  # a new value
    assert no_hr.with_drop(fp32) is no_hr  # no Y-PSNR: no drop
    assert Quality.from_json(q.with_drop(fp32).to_json()) == q.with_drop(fp32)
