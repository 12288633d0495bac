"""Bundled trainer: losses, data, config, EMA, short real runs, exact resume and 2-process DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from paragon_export.arch import build
from paragon_export.checkpoint import load_model
from paragon_export.errors import ParagonError
from paragon_export.images import bicubic_downscale, load_image, sample_photo_paths, save_image
from paragon_export.trainer.colour import hsluv_loss, rgb_to_hsluv
from paragon_export.trainer.config import load_config
from paragon_export.trainer.data import PatchBatches
from paragon_export.trainer.ema import EMA
from paragon_export.trainer.losses import focal_frequency_loss, l1_loss, msssim_loss
from paragon_export.trainer.loop import train
from paragon_export.trainer.perceptual import DISTS, VGG16_CFG, VGG19_CFG, VGGPerceptual, vgg_features
from paragon_export.trainer.r3gan import discriminator_loss, generator_adv_loss

ROOT = Path(__file__).resolve().parents[1]


def _photo_batch(n=2, size=64, seed=0):
    """Real-photo HR crops and a slightly wrong 'SR' (blurred + shifted) that needs gradients."""
    rng = np.random.default_rng(seed)
    img = load_image(sample_photo_paths("train")[2])
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crops.append(img[y:y + size, x:x + size])
    hr = torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy())
    sr = (torch.nn.functional.avg_pool2d(hr, 3, 1, 1) * 0.9 + 0.03).requires_grad_(True)
    return sr, hr


def _assert_finite_with_grad(loss, sr):
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    (g,) = torch.autograd.grad(loss, sr)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("fn", [l1_loss, msssim_loss, focal_frequency_loss, hsluv_loss])
def test_pixel_losses_finite_with_gradients(fn):
    sr, hr = _photo_batch()
    loss = fn(sr, hr)
    _assert_finite_with_grad(loss, sr)
    with torch.no_grad():
        assert float(fn(hr, hr)) < float(loss)


def test_hsluv_matches_reference_package():
    import hsluv

    rng = np.random.default_rng(1)
    rgb = rng.random((64, 3))
    h, s, l = rgb_to_hsluv(torch.from_numpy(rgb).float().T.reshape(1, 3, 8, 8))
    ours = np.stack([np.degrees(h.flatten().numpy()), s.flatten().numpy(), l.flatten().numpy()], 1)
    ref = np.array([hsluv.rgb_to_hsluv(tuple(c)) for c in rgb])
    hue_err = np.abs((ours[:, 0] - ref[:, 0] + 180) % 360 - 180)
    assert hue_err.max() < 0.05 and np.abs(ours[:, 1:] - ref[:, 1:]).max() < 0.05


def _random_backbone(path: Path, cfg, extra=None, cut=None):
    torch.manual_seed(0)
    feats = vgg_features(cfg)
    sd = {f"features.{k}": v for k, v in feats.state_dict().items() if cut is None or int(k.split(".")[0]) < cut}
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def test_perceptual_and_dists_from_local_weights(tmp_path):
    sr, hr = _photo_batch(size=48)
    vgg = VGGPerceptual(_random_backbone(tmp_path / "vgg19.safetensors", VGG19_CFG, cut=36))
    _assert_finite_with_grad(vgg(sr, hr), sr)
    n = sum(DISTS.CHANNELS)
    ab = {"alpha": torch.rand(1, n, 1, 1) * 0.1, "beta": torch.rand(1, n, 1, 1) * 0.1}
    dists = DISTS(_random_backbone(tmp_path / "dists.safetensors", VGG16_CFG, extra=ab))
    loss = dists(sr, hr)
    _assert_finite_with_grad(loss, sr)
    assert float(dists(hr, hr)) < float(loss.detach())
    with pytest.raises(ParagonError, match="nope.safetensors"):
        VGGPerceptual(tmp_path / "nope.safetensors")
    with pytest.raises(ParagonError, match="missing features.0.weight"):
        DISTS(_random_backbone(tmp_path / "partial.safetensors", VGG16_CFG, cut=0))


def test_r3gan_losses_finite_with_gradients():
    from paragon_export.arch.munet import MUNet

    torch.manual_seed(0)
    disc = MUNet(base_channels=8)
    sr, hr = _photo_batch(size=40)  # not a multiple of 16
    _assert_finite_with_grad(generator_adv_loss(disc, sr, hr), sr)
    d_loss, parts = discriminator_loss(disc, sr.detach(), hr, r1_gamma=1.0, r2_gamma=1.0)
    d_loss.backward()
    assert torch.isfinite(d_loss) and parts["r1"] > 0 and parts["r2"] > 0
    grads = [p.grad for p in disc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_ema_copies_tracked_kernel_flags():
    torch.manual_seed(0)
    model = build("paragonsr2_nano", scale=2)
    ema = EMA(model, 0.999)
    assert ema.module.uninitialized_kernels()
    model.train()
    model(torch.rand(2, 3, 16, 16))
    ema.update(model, 1)
    assert not ema.module.uninitialized_kernels()
    for (_, a), (_, b) in zip(ema.module.transformers(), model.transformers()):
        assert torch.equal(a.tracked_kernel, b.tracked_kernel)
    ema.module.fuse_for_release()  # raises if any kernel were uninitialised


def test_config_rejects_unknown_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stesp: 10\n")
    with pytest.raises(ParagonError, match="'train.stesp'"):
        load_config(cfg)
    with pytest.raises(ParagonError, match="'loss.l2'"):
        load_config(None, ["loss.l2=1"])
    assert load_config(None, ["train.lr=1e-3", "data.batch_size=3"])["train"]["lr"] == pytest.approx(1e-3)


def _photo_folder(folder: Path, sizes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    img = load_image(sample_photo_paths("train")[2])
    for i, (h, w) in enumerate(sizes):
        save_image(img[:h, :w], folder / f"p{i}.png")
    return folder


def test_data_skips_small_images_and_rejects_empty(tmp_path):
    folder = _photo_folder(tmp_path / "hr", [(80, 90), (20, 30), (64, 64)])
    cfg = load_config(None, [f"data.hr_dir={folder}", "data.lr_crop=16", "data.batch_size=3",
                             "data.downscale=[bicubic, bilinear, area]", "data.blur_prob=0.5",
                             "data.noise_prob=0.5", "data.jpeg_prob=0.5"])["data"]
    with pytest.warns(UserWarning, match=r"p1\.png \(30x20\)"):
        ds = PatchBatches(cfg, 2, seed=0)
    lr, hr = ds[5]
    assert lr.shape == (3, 3, 16, 16) and hr.shape == (3, 3, 32, 32)
    assert torch.equal(ds[5][0], lr)  # a batch is a pure function of the step
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParagonError, match="no images"):
        PatchBatches({**cfg, "hr_dir": str(tmp_path / "empty")}, 2, seed=0)


def test_paired_mode_aligns_crops(tmp_path):
    hr_dir = _photo_folder(tmp_path / "hr", [(64, 80)])
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    hr_img, lr_img = bicubic_downscale(load_image(hr_dir / "p0.png"), 2)
    save_image(lr_img, lr_dir / "p0.png")
    cfg = load_config(None, [f"data.hr_dir={hr_dir}", f"data.lr_dir={lr_dir}", "data.lr_crop=12",
                             "data.batch_size=2"])["data"]
    lr, hr = PatchBatches(cfg, 2, seed=0)[0]
    # each LR patch must be the bicubic downscale of its HR patch (up to 8-bit rounding/borders)
    for i in range(2):
        _, ref = bicubic_downscale(hr[i].numpy().transpose(1, 2, 0), 2)
        assert np.abs(ref[2:-2, 2:-2] - lr[i].numpy().transpose(1, 2, 0)[2:-2, 2:-2]).mean() < 0.02


def _tiny_cfg(out: Path, *extra: str, steps: int = 20) -> dict:
    return load_config(None, [
        f"out_dir={out}", "threads=1", "data.lr_crop=16", "data.batch_size=4", f"train.steps={steps}",
        "train.lr=2e-3", "train.warmup_steps=2", "train.static_from=0.75", f"checkpoint.every={steps // 2}",
        "val.every=0", "log.every=1", "log.progress=false", *extra])


def _losses(out: Path, key="loss") -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_short_run_lowers_l1_and_writes_loadable_checkpoints(tmp_path):
    out = tmp_path / "run"
    cfg = _tiny_cfg(out, "val.every=20", "val.max_lr_size=24")
    result = train(cfg)
    ds = PatchBatches(cfg["data"], 2, seed=123)
    lr, hr = ds[0]
    torch.manual_seed(0)
    before = build("paragonsr2_nano", scale=2).eval()
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    after = load_model(latest / "generator.safetensors").model
    with torch.no_grad():
        l_before, l_after = float(l1_loss(before(lr), hr)), float(l1_loss(after(lr), hr))
    assert l_after < 0.7 * l_before, (l_before, l_after)
    ema = load_model(out / "ema_final.safetensors")  # no --scale needed: metadata has it
    assert ema.scale == 2 and not ema.model.uninitialized_kernels()
    m = result["mean"]
    assert {"bicubic_psnr", "dynamic_psnr", "static_psnr", "fused_psnr"} <= set(m)
    assert abs(m["fused_psnr"] - m["static_psnr"]) < 0.01
    with pytest.raises(ParagonError, match="already holds a run"):
        train(cfg)


def test_resume_equals_uninterrupted(tmp_path):
    gan = ("loss.gan=0.01", "loss.r1_gamma=0.5", "discriminator.base_channels=8")
    full = tmp_path / "full"
    train(_tiny_cfg(full, *gan, steps=12))
    # Simulate a run killed after step 6: keep only that checkpoint and the log up to it.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000012")
    (cut / "checkpoints" / "latest").write_text("step_00000006")
    (cut / "ema_final.safetensors").unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["step"] <= 6) + "\n")
    train(_tiny_cfg(cut, *gan, steps=12), resume=True)
    assert _losses(cut) == _losses(full) and len(_losses(full)) == 12
    assert _losses(cut, "d_adv") == _losses(full, "d_adv")
    for name in ("generator", "ema", "discriminator"):
        a = load_file(str(full / "checkpoints" / "step_00000012" / f"{name}.safetensors"))
        b = load_file(str(cut / "checkpoints" / "step_00000012" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ddp_two_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "paragon_export.trainer", "-o", f"out_dir={out}", "-o", "threads=1", "-o", "data.lr_crop=16",
           "-o", "data.batch_size=2", "-o", "train.steps=4", "-o", "train.static_from=0.5",
           "-o", "checkpoint.every=2", "-o", "val.every=0", "-o", "log.progress=false",
           "-o", "loss.gan=0.01", "-o", "discriminator.base_channels=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "ranks" in r][-1]
    assert rec["world_size"] == 2 and len(rec["ranks"]) == 2 and rec["ranks"][0] == rec["ranks"][1]
    assert load_model(out / "ema_final.safetensors").scale == 2


def test_cli_reports_bad_config_in_one_line(tmp_path):
    from click.testing import CliRunner

    from paragon_export.trainer.cli import main

    res = CliRunner().invoke(main, ["-o", "train.stpes=5"])
    assert res.exit_code == 1 and "Error: unknown config key 'train.stpes'" in res.output
    res = CliRunner().invoke(main, ["-o", f"data.hr_dir={tmp_path / 'missing'}", "-o", f"out_dir={tmp_path}/r"])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output


def test_embedded_default_is_trained_and_fuses_without_gap():
    from paragon_export.defaults import default_checkpoint
    from paragon_export.trainer.validate import evaluate, val_pairs

    loaded = load_model(default_checkpoint())
    assert (loaded.variant, loaded.scale, loaded.upsampler, loaded.fused) == ("paragonsr2_nano", 2, "mks2021", False)
    assert not loaded.model.uninitialized_kernels()
    m = evaluate(loaded.model, val_pairs(None, 2, 96))["mean"]  # held-out photos, centre crops
    assert m["fused_psnr"] - m["bicubic_psnr"] >= 0.5, m
    assert abs(m["fused_psnr"] - m["dynamic_psnr"]) <= 0.05, m


def test_sigkill_loses_at_most_one_interval_and_resumes(tmp_path):
    import signal
    import time

    out = tmp_path / "killed"
    args = ["-o", f"out_dir={out}", "-o", "threads=1", "-o", "data.lr_crop=16", "-o", "data.batch_size=2",
            "-o", "train.steps=400", "-o", "checkpoint.every=5", "-o", "val.every=0", "-o", "log.every=1",
            "-o", "log.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "paragon_export.trainer", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (out / "checkpoints" / "step_00000015").is_dir():
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = max(r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()[:-1]))
    latest = (out / "checkpoints" / "latest").read_text()
    saved = int(latest.split("_")[1])
    assert saved >= 15 and done - saved <= 5 + 1, (done, saved)  # +1: the step being logged when killed
    cfg = load_config(None, [a for a in args if a != "-o"] + ["train.steps=" + str(saved + 2)])
    train(cfg, resume=True)
    assert not list((out / "checkpoints").glob(".step_*"))
    assert load_model(out / "ema_final.safetensors").scale == 2


def test_bad_optimiser_values_and_out_dir_are_one_line(tmp_path):
    # Issue 18 item 6: torch raised a ValueError traceback for a negative lr; a file in out_dir's path
    # failed in mkdir after the model was built.
    from click.testing import CliRunner

    from paragon_export.trainer.cli import main

    a_file = tmp_path / "FILE"
    a_file.write_text("x")
    cases = [
        (["-o", "train.lr=-1"], "train.lr must be > 0, got -1"),
        (["-o", "train.lr=.nan"], "train.lr must be a finite number"),
        (["-o", "train.ema_decay=1.5"], "train.ema_decay must be in [0, 1]"),
        (["-o", "train.betas=[0.9, 1.2]"], "train.betas must be two numbers in [0, 1)"),
        (["-o", "discriminator.lr=0"], "discriminator.lr must be > 0"),
        (["--out-dir", str(a_file / "x")], f"{a_file} is a file, not a folder"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(main, [*args, "-o", "train.steps=1", "-o", "log.progress=false"])
        assert res.exit_code == 1 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert a_file.read_text() == "x"


def test_resume_logs_each_step_once(tmp_path):
    # Issue 18 item 8: a run killed after logging steps past its last checkpoint re-logged them on --resume.
    out = tmp_path / "run"
    train(_tiny_cfg(out, steps=4))
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    (out / "ema_final.safetensors").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a record cut short by the kill
    train(_tiny_cfg(out, steps=4), resume=True)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4], steps
