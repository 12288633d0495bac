"""Generator losses (pixel, structure, frequency, colour, perceptual, adversarial), each weighted
in the config; a weight of 0 leaves the loss out entirely (no weights loaded, no compute)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .colour import hsluv_loss
from .perceptual import DISTS, VGGPerceptual
from .r3gan import generator_adv_loss


def l1_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(sr, hr)


_MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def msssim_loss(sr: torch.Tensor, hr: torch.Tensor, win_size: int = 7) -> torch.Tensor:
    """1 - MS-SSIM built on pytorch-msssim's SSIM kernel, with as many scales as the patch allows
    (its `ms_ssim` insists on 5 scales, i.e. patches over 16*(win-1) pixels)."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    x, y = sr.float().clamp(0, 1), hr.float()
    levels = 1
    while levels < len(_MSSSIM_WEIGHTS) and min(x.shape[-2:]) >= (win_size - 1) * 2 ** levels:
        levels += 1
    w = torch.tensor(_MSSSIM_WEIGHTS[:levels], device=x.device)
    w = w / w.sum()
    win = _fspecial_gauss_1d(win_size, 1.5).to(x.device).repeat([x.shape[1], 1, 1, 1])
    vals = []
    for i in range(levels):
        ssim_pc, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False, K=(0.01, 0.03))
        if i < levels - 1:
            vals.append(torch.relu(cs))
            pad = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    vals.append(torch.relu(ssim_pc))
    ms = torch.prod(torch.stack(vals) ** w.view(-1, 1, 1), dim=0)
    return 1 - ms.mean()


def focal_frequency_loss(sr: torch.Tensor, hr: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Focal frequency loss (Jiang et al. 2021): spectrum distance weighted towards the frequencies
    that are hardest to synthesise (weights from the detached distance, normalised per image)."""
    fs = torch.fft.fft2(sr.float(), norm="ortho")
    fh = torch.fft.fft2(hr.float(), norm="ortho")
    dist = (fs - fh).abs() ** 2
    with torch.no_grad():
        w = dist.sqrt() ** alpha
        w = w / w.flatten(-2).amax(-1).clamp_min(1e-12)[..., None, None]
    return (w * dist).mean()


class GeneratorLoss(nn.Module):
    """Weighted sum of the enabled losses; returns (total, {name: value})."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.w = {k: float(cfg[k]) for k in ("l1", "msssim", "ffl", "hsluv", "perceptual", "dists", "clip", "gan")}
        self.gan_start = int(cfg["gan_start"])
        self.vgg = VGGPerceptual(cfg["vgg_weights"]) if self.w["perceptual"] > 0 else None
        self.dists = DISTS(cfg["dists_weights"]) if self.w["dists"] > 0 else None
        self.clip = None
        if self.w["clip"] > 0:  # lazy: the [clip] extra (transformers) is only needed when the loss is on
            from .clip import ClipContrastive

            self.clip = ClipContrastive(cfg["clip_weights"], float(cfg["clip_temperature"]))

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, *, lr: torch.Tensor | None = None,
                disc: nn.Module | None = None, step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        terms: dict[str, torch.Tensor] = {}
        if self.w["l1"]:
            terms["l1"] = l1_loss(sr, hr)
        if self.w["msssim"]:
            terms["msssim"] = msssim_loss(sr, hr)
        if self.w["ffl"]:
            terms["ffl"] = focal_frequency_loss(sr, hr)
        if self.w["hsluv"]:
            terms["hsluv"] = hsluv_loss(sr, hr)
        if self.vgg is not None:
            terms["perceptual"] = self.vgg(sr, hr)
        if self.dists is not None:
            terms["dists"] = self.dists(sr, hr)
        if self.clip is not None:
            if lr is None:
                raise ValueError("the clip loss needs the LR batch (its bicubic upscale is the negative)")
            terms["clip"] = self.clip(sr, hr, lr)
        if self.w["gan"] and disc is not None and step >= self.gan_start:
            terms["gan"] = generator_adv_loss(disc, sr, hr)
        if not terms:
            raise ValueError("every loss weight is 0")
        total = sum(self.w[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}
