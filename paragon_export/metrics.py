"""Quality metrics, as defined in SPEC §6 (Y channel BT.601, MATLAB convention, border = scale)."""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def to_y(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 float RGB in [0,1] -> Y in [16,235] (BT.601, as MATLAB's rgb2ycbcr)."""
    rgb = np.clip(rgb.astype(np.float64), 0.0, 1.0)
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def _crop(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border] if border > 0 else a


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    return psnr(_crop(to_y(sr), border), _crop(to_y(hr), border), data_range=255.0)


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    a, b = _crop(to_y(sr), border), _crop(to_y(hr), border)
    return float(structural_similarity(a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def json_finite(obj):
    """A report made JSON-safe: a metric that is not finite (an identical output's infinite PSNR, a
    NaN) is recorded as null, in nested dicts and lists alike."""
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
