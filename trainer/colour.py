"""HSLuv colour loss: sRGB -> HSLuv as differentiable tensor ops (same constants and steps as the
reference `hsluv` package, which the tests compare against)."""

from __future__ import annotations

import math

import torch

_M = ((3.240969941904521, -1.537383177570093, -0.498610760293),
      (-0.96924363628087, 1.87596750150772, 0.041555057407175),
      (0.055630079696993, -0.20397695888897, 1.056971514242878))
_M_INV = ((0.41239079926595, 0.35758433938387, 0.18048078840183),
          (0.21263900587151, 0.71516867876775, 0.072192315360733),
          (0.019330818715591, 0.11919477979462, 0.95053215224966))
_REF_U, _REF_V = 0.19783000664283, 0.46831999493879
_KAPPA, _EPS = 903.2962962, 0.0088564516


def _max_chroma(l: torch.Tensor, h_rad: torch.Tensor) -> torch.Tensor:
    """Largest chroma inside the sRGB gamut for lightness l and hue h (HSLuv's ray/bound test)."""
    sub1 = (l + 16) ** 3 / 1560896
    sub2 = torch.where(sub1 > _EPS, sub1, l / _KAPPA)
    sin_h, cos_h = torch.sin(h_rad), torch.cos(h_rad)
    best = torch.full_like(l, float("inf"))
    for m1, m2, m3 in _M:
        for t in (0, 1):
            top1 = (284517 * m1 - 94839 * m3) * sub2
            top2 = (838422 * m3 + 769860 * m2 + 731718 * m1) * l * sub2 - 769860 * t * l
            bottom = (632260 * m3 - 126452 * m2) * sub2 + 126452 * t
            slope, intercept = top1 / bottom, top2 / bottom
            denom = sin_h - slope * cos_h
            length = intercept / torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
            best = torch.where(length >= 0, torch.minimum(best, length), best)
    return best


def rgb_to_hsluv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N,3,H,W) sRGB in [0,1] -> (hue radians, saturation 0-100, lightness 0-100)."""
    rgb = rgb.float().clamp(0, 1)
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp_min(1e-12) ** 2.4)
    r, g, b = lin.unbind(1)
    x, y, z = (m[0] * r + m[1] * g + m[2] * b for m in _M_INV)
    l = torch.where(y <= _EPS, y * _KAPPA, 116 * y.clamp_min(1e-12) ** (1 / 3) - 16)
    div = (x + 15 * y + 3 * z).clamp_min(1e-12)
    u = 13 * l * (4 * x / div - _REF_U)
    v = 13 * l * (9 * y / div - _REF_V)
    c = torch.sqrt(u * u + v * v + 1e-12)
    h = torch.atan2(v, u)
    h = torch.where(h < 0, h + 2 * math.pi, h)
    valid = (l > 1e-8) & (l < 99.9999999)
    s = torch.where(valid, c / _max_chroma(l, h).clamp_min(1e-8) * 100, torch.zeros_like(c))
    return h, s.clamp(0, 100), l


def hsluv_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Lightness and saturation L1 plus a circular hue distance weighted by the target's
    saturation (hue is meaningless for grey pixels)."""
    h1, s1, l1 = rgb_to_hsluv(sr)
    h2, s2, l2 = rgb_to_hsluv(hr)
    hue = (1 - torch.cos(h1 - h2)) * (s2.detach() / 100)
    return ((l1 - l2).abs() / 100).mean() + ((s1 - s2).abs() / 100).mean() + hue.mean()
