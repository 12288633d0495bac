"""Fixed-filter upsamplers: Magic-Conv (legacy and MKS2021 tap sets).

Both tap sets resample with a stride-s depthwise transposed convolution (SPEC §3), in one of two
forms with the same sums (equal up to float rounding) and the same state dict:
- `transpose` (default): one depthwise ConvTranspose. Fastest overall: on OpenVINO and in torch.
- `polyphase`: one depthwise Conv on the LR grid with s*s outputs per channel (one per output
  phase), then a stride-s ConvTranspose with one-hot s x s kernels that only interleaves the phases.
  Plain Pad/Conv/ConvTranspose still; faster on ONNX Runtime CPU, slower on OpenVINO
  (README, "Magic upsampler export form", has the measurement).
The taps are buffers: they are part of the state-dict contract but are never trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEGACY_SHARPEN = (-1.0, 0.0, 9.0, 16.0, 9.0, 0.0, -1.0)  # /32
LEGACY_BLUR = (1.0, 4.0, 6.0, 4.0, 1.0)  # /16
SHARP_2021 = (-1.0, 6.0, -35.0, 204.0, -35.0, 6.0, -1.0)  # /144
FORMS = ("transpose", "polyphase")


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
        self.channels = channels  # a Python int: kernels built from it keep a static traced shape
        self.conv_h = _Taps(channels, taps, vertical=False)
        self.conv_v = _Taps(channels, taps, vertical=True)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-padded 'same' separable depthwise convolution."""
        c = x.shape[1]
        wh, wv = self.conv_h.weight, self.conv_v.weight
        x = F.conv2d(x, wh.to(x.dtype), padding=(0, wh.shape[-1] // 2), groups=c)
        return F.conv2d(x, wv.to(x.dtype), padding=(wv.shape[-2] // 2, 0), groups=c)

    def taps_1d(self, scale: int, box: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(vertical, horizontal) 1-D transposed-conv taps, each (C, K), from the stored filters.

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
        return v, h

    def transpose_kernel(self, scale: int, box: bool) -> torch.Tensor:
        """2-D depthwise ConvTranspose kernel (C,1,K,K) from the stored 1-D taps."""
        v, h = self.taps_1d(scale, box)
        return (v[:, :, None] * h[:, None, :]).unsqueeze(1)

    def forward(self, x: torch.Tensor, scale: int, *, box: bool, padding: int) -> torch.Tensor:
        """conv_transpose2d(x, transpose_kernel, stride=scale, padding=padding, groups=C) computed
        as a polyphase depthwise Conv + a one-hot interleave (a module call, so its ONNX nodes are
        /magic_upsampler/resample_conv/...; the sharpen Convs keep their names)."""
        c = x.shape[1]
        v, h = self.taps_1d(scale, box)
        pv, lo, hi = polyphase_taps(v, scale, padding)
        ph, _, _ = polyphase_taps(h, scale, padding)
        # Output channel c*s*s + a*s + b is phase (row a, column b) of channel c.
        # flatten, not reshape(c*s*s, ...): sizes from x.shape would make the traced kernel's shape dynamic
        w = (pv[:, :, None, :, None] * ph[:, None, :, None, :]).flatten(0, 2).unsqueeze(1)
        if lo == hi:
            y = F.conv2d(x, w.to(x.dtype), padding=lo, groups=c)
        else:
            y = F.conv2d(F.pad(x, (lo, hi, lo, hi)), w.to(x.dtype), groups=c)
        if scale == 1:
            return y
        # Interleave: a stride-s ConvTranspose whose s x s kernel for phase (a, b) is 1 at (a, b), 0
        # elsewhere (exact: each output is one input times 1). No DepthToSpace (SPEC §3: no
        # PixelShuffle), and on ONNX Runtime CPU faster than its DepthToSpace (README).
        onehot = torch.eye(scale * scale, dtype=x.dtype, device=x.device).reshape(scale * scale, 1, scale, scale)
        return F.conv_transpose2d(y, onehot.repeat(self.channels, 1, 1, 1), stride=scale, groups=c)


def polyphase_taps(taps: torch.Tensor, scale: int, padding: int) -> tuple[torch.Tensor, int, int]:
    """Split the 1-D taps (C, K) of a stride-`scale` transposed convolution with `padding` into
    `scale` phase filters (C, scale, L) for a plain correlation on the LR grid, and the zero
    padding (before, after) that correlation needs.

    Transposed conv: y[o] = sum over i, k with o = i*s - padding + k of x[i] * w[k]. For output
    o = q*s + p and LR offset d = i - q that is tap k = p + padding - d*s, so phase p correlates x
    around q with taps w[p + padding - d*s] for d = lo_d..hi_d (zero where k is out of range).
    """
    k, s = taps.shape[-1], scale
    if (k - 2 * padding) % s:
        raise ValueError(f"{k} taps with padding {padding} do not give a whole LR grid at stride {s}")
    d_lo = min(-((k - 1 - p - padding) // s) for p in range(s))  # ceil((p + padding - k + 1) / s)
    d_hi = max((p + padding) // s for p in range(s))
    n = d_hi - d_lo + 1
    index = [[p + padding - (d_lo + j) * s for j in range(n)] for p in range(s)]
    index = torch.tensor([[i + 1 if 0 <= i < k else 0 for i in row] for row in index], device=taps.device)
    padded = torch.cat((torch.zeros_like(taps[:, :1]), taps), dim=1)  # column 0: the zero tap
    out_len_extra = (k - 2 * padding) // s - 1  # LR outputs = inputs + this
    before = -d_lo
    return padded[:, index], before, out_len_extra + n - 1 - before


class MagicUpsampler(nn.Module):
    """Magic-Conv upsampler on C-channel features.

    `legacy`: 7-tap LR filter (zero pad) -> nearest x s -> 5-tap blur, as traiNNer-redux computes it.
    `mks2021`: Magic Kernel resample x s -> Sharp 2021 filter, with edge-replicating padding so that
    tiled inference has no dark seams.
    """

    def __init__(self, *, channels: int, scale: int, taps: str = "mks2021", form: str = "transpose") -> None:
        super().__init__()
        if taps not in ("legacy", "mks2021"):
            raise ValueError(f"unknown Magic tap set {taps!r} (expected 'legacy' or 'mks2021')")
        if form not in FORMS:
            raise ValueError(f"unknown Magic resampling form {form!r} (expected one of {FORMS})")
        self.scale = scale
        self.taps = taps
        self.form = form  # how to compute (and export) the resampling; no state, same result
        if taps == "legacy":
            self.sharpen = _Separable(channels, torch.tensor(LEGACY_SHARPEN) / 32)
            self.resample_conv = _Separable(channels, torch.tensor(LEGACY_BLUR) / 16)
        else:
            self.sharpen = _Separable(channels, torch.tensor(SHARP_2021) / 144)
            self.resample_conv = _Separable(channels, magic_kernel_taps(scale))

    def _resample(self, x: torch.Tensor, *, box: bool, padding: int) -> torch.Tensor:
        s = self.scale
        if self.form == "polyphase":
            return self.resample_conv(x, s, box=box, padding=padding)
        w = self.resample_conv.transpose_kernel(s, box=box).to(x.dtype)
        return F.conv_transpose2d(x, w, stride=s, padding=padding, groups=x.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, c = self.scale, x.shape[1]
        if self.taps == "legacy":
            x = self.sharpen.conv(x)
            # (4 + s) taps (5-tap blur * length-s box), centred: padding 2
            return self._resample(x, box=True, padding=2)
        # Replicate one LR pixel per side: the edge behaves like an infinite continuation of the
        # border (no dark rim). padding=2s drops the s HR pixels that pad produced on each side, so
        # the export needs no Slice.
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        x = self._resample(x, box=False, padding=2 * s)
        r = self.sharpen.conv_h.weight.shape[-1] // 2
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, self.sharpen.conv_h.weight.to(x.dtype), groups=c)
        return F.conv2d(x, self.sharpen.conv_v.weight.to(x.dtype), groups=c)
