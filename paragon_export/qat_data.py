"""qat_data: the training patches of a QAT run, cut from the calibration images (never from the
held-out split) with a seeded generator, so a resumed run sees the batches an uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ParagonError
from .images import bicubic_downscale, list_images, sample_photo_paths

PATCHES_PER_IMAGE = 16


@dataclass
class TrainPatches:
    """Seeded (LR, HR) patch pool cut from the calibration images (never from the held-out split).
    A step's batch depends only on (seed, step), so a resumed run sees the batches an
    uninterrupted one would have."""

    lr: np.ndarray  # N x 3 x p x p
    hr: np.ndarray  # N x 3 x ps x ps
    seed: int

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(0, len(self.lr), size)
        lr, hr = self.lr[idx], self.hr[idx]
        # Flips and transposes: the same dihedral transform on LR and HR.
        if rng.random() < 0.5:
            lr, hr = lr[..., ::-1], hr[..., ::-1]
        if rng.random() < 0.5:
            lr, hr = lr[..., ::-1, :], hr[..., ::-1, :]
        if rng.random() < 0.5:
            lr, hr = lr.swapaxes(-1, -2), hr.swapaxes(-1, -2)
        return torch.from_numpy(np.ascontiguousarray(lr)), torch.from_numpy(np.ascontiguousarray(hr))


def calibration_image_paths(data_dir: Path | None, names: list[str]) -> list[Path]:
    paths = sample_photo_paths("train") if data_dir is None else list_images(data_dir)
    wanted = set(names)
    return [p for p in paths if p.name in wanted]


def train_patches(paths: list[Path], *, scale: int, patch: int, seed: int,
                  per_image: int = PATCHES_PER_IMAGE) -> TrainPatches:
    from paragon_export.calibration.sources import Decoded, decode

    lrs, hrs = [], []
    hp = patch * scale
    for p in paths:
        d = decode(p, min_hw=(hp, hp))
        if not isinstance(d, Decoded):
            continue
        rng = np.random.default_rng([seed, len(p.name), *p.name.encode()])
        img = d.image
        for _ in range(per_image):
            top = int(rng.integers(0, img.shape[0] // scale - patch + 1)) * scale
            left = int(rng.integers(0, img.shape[1] // scale - patch + 1)) * scale
            hr, lr = bicubic_downscale(img[top:top + hp, left:left + hp], scale)
            lrs.append(lr.transpose(2, 0, 1))
            hrs.append(hr.transpose(2, 0, 1))
    if not lrs:
        raise ParagonError(f"no calibration image is at least {hp}x{hp} px: cannot cut {patch}px training patches "
                           "(use smaller --patch)")
    return TrainPatches(np.stack(lrs).astype(np.float32), np.stack(hrs).astype(np.float32), seed)
