"""Decode and validate the images a calibration set is built from.

Every image becomes float32 RGB in [0, 1] (8/16-bit, gray, RGBA and palette files are converted by
`paragon_export.images.load_image`). Unreadable, truncated and too-small files are skipped and listed,
so one bad file in a folder of photos does not stop a run; an empty result is an error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paragon_export.errors import ParagonError
from paragon_export.images import list_images, load_image


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Decoded:
    path: Path
    image: np.ndarray  # HxWx3 float32 in [0, 1]


def decode(path: Path, *, min_hw: tuple[int, int]) -> Decoded | Skipped:
    """Decode one file, or say why it is skipped (unreadable, truncated, NaN/Inf, smaller than `min_hw`)."""
    try:
        img = load_image(path)
    except ParagonError as e:
        return Skipped(str(path), f"unreadable ({str(e).split(': ', 1)[-1]})")
    if not np.isfinite(img).all():
        return Skipped(str(path), "contains NaN/Inf values")
    h, w = img.shape[:2]
    if h < min_hw[0] or w < min_hw[1]:
        return Skipped(str(path), f"too small ({w}x{h} px, needs at least {min_hw[1]}x{min_hw[0]})")
    return Decoded(Path(path), img)


def folder_paths(folder: Path | str) -> list[Path]:
    paths = list_images(folder)
    if not paths:
        raise ParagonError(f"calibration folder {folder} holds no images "
                           "(.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff)")
    return paths


def require_some(usable: list, skipped: list[Skipped], where: str) -> None:
    if usable:
        return
    detail = "; ".join(str(s) for s in skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    raise ParagonError(f"no usable calibration image in {where} ({detail})")


def readable_images(paths: list[Path], *, min_hw: tuple[int, int] = (1, 1)) -> tuple[list[Decoded], list[Skipped]]:
    """Decode every file first, as calibration does: (usable images, skipped files with the reason),
    so one unreadable file among a user's images is listed instead of stopping a command midway."""
    usable: list[Decoded] = []
    skipped: list[Skipped] = []
    for p in paths:
        d = decode(p, min_hw=min_hw)
        (usable if isinstance(d, Decoded) else skipped).append(d)
    return usable, skipped


def readable_folder(folder: Path | str) -> tuple[list[Path], list[Skipped]]:
    """A user's image folder (parity --images, fuse --hr) checked whole before use: the readable
    files and the skipped ones; one line when it holds nothing readable."""
    paths = list_images(folder)
    if not paths:
        raise ParagonError(f"no images in {folder}")
    usable, skipped = readable_images(paths)
    if not usable:
        raise ParagonError(f"no readable image in {folder} ({'; '.join(str(s) for s in skipped[:3])})")
    return [d.path for d in usable], skipped
