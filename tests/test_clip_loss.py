"""CLIP contrastive loss (issue 19) on transformers' real CLIP vision architecture with small random
local weights: its definition and properties, its one-line errors, and a 50-step run of the whole
perceptual recipe (trainer/configs/nano_x2_perceptual.yaml) that resumes bit-exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_trainer import _losses, _random_backbone

from paragon_export.errors import ParagonError
from paragon_export.images import load_image, sample_photo_paths
from paragon_export.trainer.clip import ClipContrastive, info_nce
from paragon_export.trainer.cli import main as train_cli
from paragon_export.trainer.config import load_config
from paragon_export.trainer.loop import train
from paragon_export.trainer.perceptual import DISTS, VGG16_CFG, VGG19_CFG

ROOT = Path(__file__).resolve().parents[1]
# The real ViT architecture, shrunk so a forward pass costs milliseconds on CPU.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=16)


def write_tiny_clip(folder: Path, *, full: bool = False, seed: int = 0) -> Path:
    """A Hugging Face CLIP folder (config.json + model.safetensors) with random weights: the vision-only
    layout, or (full=True) a whole CLIPModel as openai/clip-vit-* ships it."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=2)
        cfg = CLIPConfig(vision_config=TINY, text_config=text, projection_dim=16)
        model = CLIPModel(cfg)
    else:
        cfg = CLIPVisionConfig(**TINY, projection_dim=16)
        model = CLIPVisionModelWithProjection(cfg)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return folder


def _crops(n: int = 4, size: int = 48, factor: int = 2, seed: int = 0):
    """HR crops from n different photos and their bicubic-downscaled LR."""
    rng = np.random.default_rng(seed)
    crops = []
    for path in sample_photo_paths("train")[:n]:
        img = load_image(path)
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crops.append(img[y:y + size, x:x + size])
    hr = torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy())
    lr = F.interpolate(hr, scale_factor=1 / factor, mode="bicubic", antialias=True).clamp(0, 1)
    return hr, lr


def _bicubic(lr, hr):
    return F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


def test_info_nce_is_cross_entropy_over_batch_and_own_bicubic():
    torch.manual_seed(0)
    sr, hr, bic = torch.randn(3, 5, 8).unbind(0)
    t = 0.2
    n = lambda v: v / v.norm()  # noqa: E731
    want = 0.0
    for i in range(5):
        logits = torch.stack([n(sr[i]) @ n(hr[j]) for j in range(5)] + [n(sr[i]) @ n(bic[i])]) / t
        want += float(torch.logsumexp(logits, 0) - logits[i]) / 5
    assert abs(float(info_nce(sr, hr, bic, t)) - want) < 1e-5
    # Only the crop's own bicubic is a negative: another crop's does not enter its row.
    bic2 = bic.clone()
    bic2[1] = sr[0]
    rows = [float(info_nce(sr[:1], hr[:1], b[:1], t)) for b in (bic, bic2)]
    assert rows[0] == rows[1]


def test_clip_loss_properties(tmp_path):
    loss_fn = ClipContrastive(write_tiny_clip(tmp_path / "clip"), temperature=0.1)
    hr, lr = _crops()
    bic = _bicubic(lr, hr)
    sr = (0.5 * hr + 0.5 * bic).requires_grad_(True)
    hr_in, lr_in = hr.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    loss = loss_fn(sr, hr_in, lr_in)
    assert loss.ndim == 0 and torch.isfinite(loss)
    g_sr, g_hr, g_lr = torch.autograd.grad(loss, [sr, hr_in, lr_in], allow_unused=True)
    assert torch.isfinite(g_sr).all() and g_sr.abs().sum() > 0
    assert g_hr is None and g_lr is None  # targets and negatives are constants
    loss_fn(sr, hr, lr).backward()
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.parameters())
    assert not loss_fn.train().training  # stays in eval mode
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: bf16 encoder, fp32 similarities and loss
        amp = loss_fn(sr, hr, lr)
    assert amp.dtype == torch.float32 and abs(float(amp.detach()) - float(loss.detach())) < 0.05
    assert torch.autograd.grad(amp, sr)[0].abs().sum() > 0

    with torch.no_grad():
        perm = torch.tensor([2, 0, 3, 1])
        assert torch.allclose(loss_fn(sr[perm], hr[perm], lr[perm]), loss_fn(sr, hr, lr), rtol=1e-5, atol=1e-6)
        # Each crop alone: only its bicubic upscale competes, so SR == HR must beat SR == bicubic.
        for i in range(len(hr)):
            one = slice(i, i + 1)
            assert loss_fn(hr[one], hr[one], lr[one]) < loss_fn(bic[one], hr[one], lr[one])
        # Whole batch: a random encoder barely sees x2 detail, so use x4 where the negative is clearly
        # blurrier (the in-batch negatives then cannot outweigh it).
        hr4, lr4 = _crops(size=64, factor=4)
        assert loss_fn(hr4, hr4, lr4) + 1e-3 < loss_fn(_bicubic(lr4, hr4), hr4, lr4)


def test_full_clipmodel_checkpoint_and_preprocessor_config(tmp_path):
    from transformers import CLIPModel

    folder = write_tiny_clip(tmp_path / "full", full=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    loss_fn = ClipContrastive(folder / "model.safetensors")  # the weights file works as well as its folder
    ref = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = ref.visual_projection(ref.vision_model(pixel_values=x).pooler_output)
        got = loss_fn.encoder(pixel_values=x).image_embeds
    assert got.shape == (2, 16) and torch.allclose(got, want, atol=1e-6)
    assert loss_fn.mean.flatten().tolist() == [0.5] * 3 and loss_fn.std.flatten().tolist() == [0.25] * 3
    # On-graph preprocessing: a 48x72 image is resized (shortest side) and centre-cropped to 64x64.
    assert loss_fn.preprocess(torch.rand(1, 3, 48, 72)).shape == (1, 3, 64, 64)


def test_clip_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ParagonError, match="loss.clip_weights"):
        ClipContrastive(None)
    with pytest.raises(ParagonError, match="nope.safetensors does not exist"):
        ClipContrastive(tmp_path / "nope.safetensors")
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({"x": torch.zeros(1)}, str(bare / "model.safetensors"))
    with pytest.raises(ParagonError, match="config.json"):
        ClipContrastive(bare)
    folder = write_tiny_clip(tmp_path / "clip")
    sd = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "patch_embedding" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ParagonError, match="missing vision_model.embeddings.patch_embedding.weight"):
        ClipContrastive(folder)
    with pytest.raises(ParagonError, match="clip_temperature"):
        load_config(None, ["loss.clip_temperature=0"])

    base = ["-o", f"out_dir={tmp_path / 'run'}", "-o", "loss.clip=0.1"]
    res = CliRunner().invoke(train_cli, base + ["-o", f"loss.clip_weights={tmp_path / 'missing'}"])
    assert res.exit_code == 1 and "Error: CLIP weights file" in res.output and "Traceback" not in res.output
    ok = write_tiny_clip(tmp_path / "ok")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the [clip] extra were not installed
    res = CliRunner().invoke(train_cli, base + ["-o", f"loss.clip_weights={ok}"])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "Error: loss.clip needs the optional CLIP extra" in res.output


def _recipe(out: Path, weights: dict[str, Path], *extra: str) -> dict:
    """The committed recipe, every loss on, shrunk to CPU test size (8x8 LR crops in pairs, 8-channel
    MUNet): the full-width VGG19/VGG16 and the R1/R2 double backward dominate the step time."""
    return load_config(ROOT / "trainer/configs/nano_x2_perceptual.yaml", [
        f"out_dir={out}", "data.lr_crop=8", "data.batch_size=2", "train.steps=50", "train.warmup_steps=5",
        "checkpoint.every=10", "checkpoint.keep=2", "val.every=0", "log.every=1", "log.progress=false", "loss.gan_start=10",
        "discriminator.base_channels=8", *(f"loss.{k}={v}" for k, v in weights.items()), *extra])


def test_perceptual_recipe_50_steps_resumes_bit_exactly(tmp_path):
    n = sum(DISTS.CHANNELS)
    ab = {"alpha": torch.rand(1, n, 1, 1) * 0.1, "beta": torch.rand(1, n, 1, 1) * 0.1}
    weights = {"vgg_weights": _random_backbone(tmp_path / "vgg19.safetensors", VGG19_CFG, cut=36),
               "dists_weights": _random_backbone(tmp_path / "dists.safetensors", VGG16_CFG, extra=ab),
               "clip_weights": write_tiny_clip(tmp_path / "clip")}
    full = tmp_path / "full"
    cfg = _recipe(full, weights)
    on = [k for k in ("l1", "msssim", "perceptual", "dists", "clip", "hsluv", "ffl", "gan") if cfg["loss"][k] > 0]
    assert len(on) == 8  # the recipe enables every loss
    train(cfg)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert all(k in last and np.isfinite(last[k]) for k in on + ["d_adv", "r1", "r2"]), last
    assert len(_losses(full)) == 50 and all(np.isfinite(_losses(full)))

    cut = tmp_path / "cut"  # a run killed after step 40, resumed to 50
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000050")
    (cut / "checkpoints" / "latest").write_text("step_00000040")
    (cut / "ema_final.safetensors").unlink()
    lines = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 40]
    (cut / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train(_recipe(cut, weights), resume=True)
    for key in ("loss", "clip", "d_adv"):
        assert _losses(cut, key) == _losses(full, key), key
    for name in ("generator", "ema", "discriminator"):
        a = load_file(str(full / "checkpoints" / "step_00000050" / f"{name}.safetensors"))
        b = load_file(str(cut / "checkpoints" / "step_00000050" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
