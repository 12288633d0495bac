"""Fixed-filter upsamplers: Magic-Conv (legacy and MKS2021 tap sets).

Both tap sets are written as a stride-s depthwise ConvTranspose2d so the ONNX graph holds only
Pad/Conv/ConvTranspose (no Resize). The taps are buffers: they are part of the state-dict contract
but are never trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEGACY_SHARPEN = (-1.0, 0.0, 9.0, 16.0, 9.0, 0.0, -1.0)  # /32
LEGACY_BLUR = (1.0, 4.0, 6.0, 4.0, 1.0)  # /16
SHARP_2021 = (-1.0, 6.0, -35.0, 204.0, -35.0, 6.0, -1.0)  # /144


def magic_kernel_taps(scale: int) -> torch.Tensor:
    """Quadratic B-spline (Magic Kernel) sampled for an upsampling factor `scale`.

    Returns 3*scale taps for a ConvTranspose with stride `scale` and padding `scale`; each output
    phase sums to 1 (B-splines are a partition of unity).
    """
    d = torch.arange(-scale, 2 * scale, dtype=torch.float64)
    x = ((d + 0.5) / scale - 0.5).abs()
    m = torch.where(x <= 0.5, 0.75 - x**2, torch.where(x <= 1.5, 0.5 * (x - 1.5) ** 2, torch.zeros_like(x)))
    return m.float()


class _Taps(nn.Module):
    """Holds one separable 1-D filter as a buffer named `weight` (the traiNNer key layout)."""

    def __init__(self, channels: int, taps: torch.Tensor, *, vertical: bool) -> None:
        super().__init__()
        k = taps.numel()
        shape = (channels, 1, k, 1) if vertical else (channels, 1, 1, k)
        self.register_buffer("weight", taps.reshape(1, 1, -1).repeat(channels, 1, 1).reshape(shape).clone())


class _Separable(nn.Module):
    def __init__(self, channels: int, taps: torch.Tensor) -> None:
        super().__init__()
        self.conv_h = _Taps(channels, taps, vertical=False)
        self.conv_v = _Taps(channels, taps, vertical=True)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-padded 'same' separable depthwise convolution."""
        c = x.shape[1]
        wh, wv = self.conv_h.weight, self.conv_v.weight
        x = F.conv2d(x, wh.to(x.dtype), padding=(0, wh.shape[-1] // 2), groups=c)
        return F.conv2d(x, wv.to(x.dtype), padding=(wv.shape[-2] // 2, 0), groups=c)

    def transpose_kernel(self, scale: int, box: bool) -> torch.Tensor:
        """2-D depthwise ConvTranspose kernel (C,1,K,K) from the stored 1-D taps.

        With `box`, the taps are first convolved with a length-`scale` box: nearest upsampling
        followed by the blur is exactly a stride-`scale` transposed convolution with that kernel.
        """
        h = self.conv_h.weight.reshape(self.conv_h.weight.shape[0], -1)
        v = self.conv_v.weight.reshape(self.conv_v.weight.shape[0], -1)
        if box:
            # Nearest+blur correlates with the flipped taps (a no-op for the symmetric defaults).
            h, v = h.flip(-1), v.flip(-1)
            ones = torch.ones(1, 1, scale, dtype=h.dtype, device=h.device)
            h = F.conv1d(h.unsqueeze(1), ones, padding=scale - 1).squeeze(1)
            v = F.conv1d(v.unsqueeze(1), ones, padding=scale - 1).squeeze(1)
        return (v[:, :, None] * h[:, None, :]).unsqueeze(1)


class MagicUpsampler(nn.Module):
    """Magic-Conv upsampler on C-channel features.

    `legacy`: 7-tap LR filter (zero pad) -> nearest x s -> 5-tap blur, as traiNNer-redux computes it.
    `mks2021`: Magic Kernel resample x s -> Sharp 2021 filter, with edge-replicating padding so that
    tiled inference has no dark seams.
    """

    def __init__(self, *, channels: int, scale: int, taps: str = "mks2021") -> None:
        super().__init__()
        if taps not in ("legacy", "mks2021"):
            raise ValueError(f"unknown Magic tap set {taps!r} (expected 'legacy' or 'mks2021')")
        self.scale = scale
        self.taps = taps
        if taps == "legacy":
            self.sharpen = _Separable(channels, torch.tensor(LEGACY_SHARPEN) / 32)
            self.resample_conv = _Separable(channels, torch.tensor(LEGACY_BLUR) / 16)
        else:
            self.sharpen = _Separable(channels, torch.tensor(SHARP_2021) / 144)
            self.resample_conv = _Separable(channels, magic_kernel_taps(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, c = self.scale, x.shape[1]
        if self.taps == "legacy":
            x = self.sharpen.conv(x)
            w = self.resample_conv.transpose_kernel(s, box=True).to(x.dtype)
            pad = (w.shape[-1] - s) // 2
            return F.conv_transpose2d(x, w, stride=s, padding=pad, groups=c)
        w = self.resample_conv.transpose_kernel(s, box=False).to(x.dtype)
        # Replicate one LR pixel per side: the edge behaves like an infinite continuation of the
        # border (no dark rim). padding=2s drops the s HR pixels that pad produced on each side, so
        # the export needs no Slice.
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        x = F.conv_transpose2d(x, w, stride=s, padding=2 * s, groups=c)
        r = self.sharpen.conv_h.weight.shape[-1] // 2
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, self.sharpen.conv_h.weight.to(x.dtype), groups=c)
        return F.conv2d(x, self.sharpen.conv_v.weight.to(x.dtype), groups=c)
