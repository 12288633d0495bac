"""MUNet: U-Net discriminator with spectral norm and Magic-Conv upsampling (trainer only, SPEC §4).

Differences from the original, on purpose: `in_conv` is spectrally normalised too, the Magic taps
are buffers that no initialiser touches, and inputs of any size are padded (replicate) to a multiple
of 16 and the logits cropped back, instead of failing on a skip-size mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .magic import MagicUpsampler


def _sn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2 if stride == 1 else 1))


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int) -> None:
        super().__init__()
        self.upsample = MagicUpsampler(channels=cin, scale=2, taps="mks2021")
        self.reduce = _sn(cin, cskip)
        self.merge = _sn(2 * cskip, cskip)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.reduce(self.upsample(x))
        return self.act(self.merge(torch.cat((x, skip), 1)))


class MUNet(nn.Module):
    MULTIPLE = 16  # four stride-2 stages

    def __init__(self, *, in_chans: int = 3, base_channels: int = 64) -> None:
        super().__init__()
        self.hparams = dict(in_chans=in_chans, base_channels=base_channels)
        b = base_channels
        chans = [b, b, 2 * b, 4 * b, 8 * b]  # in_conv output, then the four down stages
        self.in_conv = _sn(in_chans, b)
        self.down = nn.ModuleList(_sn(chans[i], chans[i + 1], k=4, stride=2) for i in range(4))
        self.bottleneck = nn.ModuleList(_sn(8 * b, 8 * b) for _ in range(2))
        self.up = nn.ModuleList(_Up(chans[i + 1], chans[i]) for i in reversed(range(4)))
        self.out_conv = _sn(b, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.MULTIPLE
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = self.act(self.in_conv(x))
        skips = [x]
        for conv in self.down:
            x = self.act(conv(x))
            skips.append(x)
        skips.pop()
        for conv in self.bottleneck:
            x = self.act(conv(x))
        for up in self.up:
            x = up(x, skips.pop())
        return self.out_conv(x)[..., :h, :w]
