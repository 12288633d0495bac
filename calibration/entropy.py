"""KL-divergence (entropy) range selection over ORT's collected histograms.

ORT's `HistogramCollector.get_entropy_threshold` implements TensorRT's KL search but merges bins with
Python-level loops, which is slow with the 2048-bin histograms real entropy calibration needs (the
README has the timing). This is the same search (same
candidate windows, same bin merging with ORT's integer truncation, same smoothing and KL), evaluated
for all candidate windows at once with numpy; tests check it picks ORT's thresholds."""

from __future__ import annotations

import numpy as np

SMOOTH_EPS = 1e-4  # ORT's smooth_distribution default


def _smooth(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ORT smoothing (float32): empty bins get eps, the mass is taken evenly off the others."""
    is_zero = (x == 0) & valid
    n_zero = is_zero.sum(1)
    n_nonzero = valid.sum(1) - n_zero
    eps1 = (SMOOTH_EPS * n_zero / np.maximum(n_nonzero, 1)).astype(np.float32)
    out = np.where(is_zero, np.float32(SMOOTH_EPS), x - eps1[:, None])
    out[~valid] = 0
    return out, n_nonzero > 0


def _kl(p: np.ndarray, q: np.ndarray, valid: np.ndarray) -> np.ndarray:
    p = p / p.sum(1, dtype=np.float64, keepdims=True).astype(np.float32)
    q = q / q.sum(1, dtype=np.float64, keepdims=True).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(valid, p / q, np.float32(1))
        kl = (p * np.log(ratio)).sum(1, dtype=np.float64)
    kl[~np.isfinite(kl)] = np.inf
    return kl


def _window_divergences(hist: np.ndarray, num_quantized_bins: int, first: int, last: int) -> np.ndarray:
    n = hist.size
    zero = n // 2
    i = np.arange(first, last + 1)
    start = zero - i
    end = np.minimum(zero + i + 1, n)
    length = end - start
    cols = np.arange(int(length.max()))
    valid = cols[None, :] < length[:, None]
    rows = np.arange(i.size)
    csum = np.concatenate([[0], np.cumsum(hist)])

    # reference P: the window, with everything outside it folded into its end bins
    p = np.where(valid, hist[np.minimum(start[:, None] + cols[None, :], n - 1)], 0)
    p[rows, 0] += csum[start]
    p[rows, length - 1] += csum[-1] - csum[end]
    p_nonzero = p != 0

    # candidate Q: the window (without outliers) merged into num_quantized_bins bins, each spread
    # evenly over its group wherever P is non-empty in that group (ORT truncates it to an integer)
    per = length // num_quantized_bins
    body = per * num_quantized_bins
    k = np.arange(num_quantized_bins)
    lo = start[:, None] + k[None, :] * per[:, None]
    merged = csum[lo + per[:, None]] - csum[lo]
    merged[:, -1] += csum[end] - csum[start + body]
    nz_csum = np.zeros((i.size, cols.size + 1), np.int64)
    np.cumsum(p_nonzero, axis=1, out=nz_csum[:, 1:])
    g_lo = k[None, :] * per[:, None]
    norm = nz_csum[rows[:, None], g_lo + per[:, None]] - nz_csum[rows[:, None], g_lo]
    spread = np.zeros(merged.shape, np.float64)
    np.divide(merged, norm, out=spread, where=norm != 0)
    spread = spread.astype(np.int64).astype(np.float32)
    group = np.minimum(cols[None, :] // per[:, None], num_quantized_bins - 1)
    q = np.where(cols[None, :] < body[:, None], spread[rows[:, None], group], np.float32(0))

    ps, p_ok = _smooth(p.astype(np.float32), valid)
    qs, q_ok = _smooth(q, valid)
    kl = _kl(ps, qs, valid)
    kl[~(p_ok & q_ok)] = np.inf
    return kl


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, vmin, vmax, num_quantized_bins: int = 128,
                      chunk: int = 128):
    """(low, high) minimising KL(P || Q) over the symmetric windows of a zero-centred histogram,
    clipped to the observed (vmin, vmax), as ORT's entropy calibrator defines it."""
    hist = np.asarray(hist, dtype=np.int64)
    zero = hist.size // 2
    first = num_quantized_bins // 2
    if zero < first:
        raise ValueError(f"histogram of {hist.size} bins is too small for {num_quantized_bins} quantized bins")
    kls = [_window_divergences(hist, num_quantized_bins, a, min(a + chunk - 1, zero))
           for a in range(first, zero + 1, chunk)]
    best = first + int(np.argmin(np.concatenate(kls)))
    low, high = edges[zero - best], edges[min(zero + best + 1, hist.size)]
    low, high = max(low, vmin), min(high, vmax)
    return np.asarray(low, dtype=edges.dtype), np.asarray(high, dtype=edges.dtype)
