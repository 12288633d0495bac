"""Feature losses on VGG backbones whose weights come from a local file (no hub downloads).

The layer layout matches torchvision's `vgg19().features` / `vgg16().features`, so a state dict
saved from torchvision (keys `features.N.weight`/`bias`) loads as is; classifier keys are ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paragon_export.errors import ParagonError

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg_features(cfg: tuple) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


def load_weights(path: str | Path | None, what: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a local state dict (.safetensors, or .pth via weights_only) holding `expected`'s keys."""
    if path is None:
        raise ParagonError(f"the {what} loss needs local weights: set its weights path in the config "
                           "(no downloads are made)")
    path = Path(path)
    if not path.is_file():
        raise ParagonError(f"{what} weights file {path} does not exist (no downloads are made; "
                           "save a torchvision-layout state dict there)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any decoding failure is a bad file for the user
        raise ParagonError(f"cannot read {what} weights {path}: {e}".splitlines()[0]) from None
    missing = [k for k in expected if k not in sd]
    bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or bad:
        keys = missing or bad
        raise ParagonError(f"{what} weights {path}: {'missing' if missing else 'wrong shape for'} "
                           f"{', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    return {k: sd[k].float() for k in expected}


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> None:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # always eval: the backbone is a fixed metric
        return super().train(False)


class VGGPerceptual(_Frozen):
    """L1 between VGG19 activations after relu1_2, relu2_2, relu3_4, relu4_4, relu5_4."""

    LAYERS = {3: 0.1, 8: 0.1, 17: 1.0, 26: 1.0, 35: 1.0}

    def __init__(self, weights: str | Path | None) -> None:
        super().__init__()
        self.features = vgg_features(VGG19_CFG)[:36]
        expected = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        sd = load_weights(weights, "perceptual (VGG19)", expected)
        self.features.load_state_dict({k[len("features."):]: v for k, v in sd.items()})
        self.freeze()

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        x = torch.cat([sr, hr]).float()
        x = (x - self.mean) / self.std
        loss = x.new_zeros(())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.LAYERS:
                a, b = x.chunk(2)
                loss = loss + self.LAYERS[i] * F.l1_loss(a, b.detach())
        return loss


class _L2Pool(nn.Module):
    """DISTS' anti-aliased pooling: sqrt of a Hann-filtered, stride-2 average of x^2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5])
        g = a[:, None] * a[None, :]
        self.register_buffer("filter", (g / g.sum()).expand(channels, 1, 3, 3).contiguous(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.conv2d(x * x, self.filter, stride=2, padding=1, groups=self.channels) + 1e-12).sqrt()


class DISTS(_Frozen):
    """DISTS (Ding et al. 2020): structure and texture similarity of VGG16 features with learned
    per-channel weights. The file holds VGG16 `features.N.*` plus `alpha`, `beta` (1,1475,1,1)."""

    CHANNELS = (3, 64, 128, 256, 512, 512)

    def __init__(self, weights: str | Path | None) -> None:
        super().__init__()
        vgg = vgg_features(VGG16_CFG)
        expected = {f"features.{k}": v for k, v in vgg.state_dict().items()}
        n = sum(self.CHANNELS)
        expected.update(alpha=torch.empty(1, n, 1, 1), beta=torch.empty(1, n, 1, 1))
        sd = load_weights(weights, "DISTS", expected)
        vgg.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        cut = ((0, 4), (5, 9), (10, 16), (17, 23), (24, 30))  # conv blocks without their max-pool
        pools = (None, 64, 128, 256, 512)
        self.stages = nn.ModuleList(
            nn.Sequential(*([_L2Pool(p)] if p else []), *vgg[a:b]) for (a, b), p in zip(cut, pools))
        self.alpha = nn.Parameter(sd["alpha"])
        self.beta = nn.Parameter(sd["beta"])
        self.freeze()

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [x]
        h = (x - self.mean) / self.std
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        fx, fy = self._feats(sr.float()), self._feats(hr.float())
        w = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w, self.CHANNELS, dim=1)
        betas = torch.split(self.beta / w, self.CHANNELS, dim=1)
        c1 = c2 = 1e-6
        d1 = d2 = 0
        for x, y, a, b in zip(fx, fy, alphas, betas):
            y = y.detach()
            xm, ym = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
            s1 = (2 * xm * ym + c1) / (xm ** 2 + ym ** 2 + c1)
            d1 = d1 + (a * s1).sum(1, keepdim=True)
            xv = ((x - xm) ** 2).mean((2, 3), keepdim=True)
            yv = ((y - ym) ** 2).mean((2, 3), keepdim=True)
            cov = (x * y).mean((2, 3), keepdim=True) - xm * ym
            s2 = (2 * cov + c2) / (xv + yv + c2)
            d2 = d2 + (b * s2).sum(1, keepdim=True)
        return (1 - (d1 + d2)).mean()
