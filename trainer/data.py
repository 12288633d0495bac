"""Training patches: HR folder + on-the-fly degradation, or paired LR/HR folders.

Every batch is a pure function of (seed, rank, step): a resumed run or a run with data workers
sees exactly the batches an uninterrupted single-process run would.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from paragon_export.errors import ParagonError
from paragon_export.images import list_images, load_image, sample_photo_paths

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "area": Image.BOX}


def resize(img: np.ndarray, size_hw: tuple[int, int], kernel: str) -> np.ndarray:
    """Antialiased float resize per channel (PIL 'F' mode: no 8-bit rounding)."""
    h, w = size_hw
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F").resize((w, h), _RESAMPLE[kernel]))
             for c in range(img.shape[-1])]
    return np.clip(np.stack(chans, -1), 0.0, 1.0).astype(np.float32)


def degrade(hr: np.ndarray, scale: int, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """HR patch -> LR patch: optional blur, downscale (random kernel), optional noise and JPEG."""
    img = hr
    if cfg["blur_prob"] > 0 and rng.random() < cfg["blur_prob"]:
        sigma = rng.uniform(*cfg["blur_sigma"])
        img = gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")
    kernel = cfg["downscale"][int(rng.integers(len(cfg["downscale"])))]
    lr = img if scale == 1 else resize(img, (hr.shape[0] // scale, hr.shape[1] // scale), kernel)
    if cfg["noise_prob"] > 0 and rng.random() < cfg["noise_prob"]:
        lr = lr + rng.normal(0.0, rng.uniform(*cfg["noise_sigma"]), lr.shape).astype(np.float32)
    if cfg["jpeg_prob"] > 0 and rng.random() < cfg["jpeg_prob"]:
        q = int(rng.integers(cfg["jpeg_quality"][0], cfg["jpeg_quality"][1] + 1))
        buf = io.BytesIO()
        Image.fromarray((np.clip(lr, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, "JPEG", quality=q)
        lr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return np.clip(lr, 0.0, 1.0).astype(np.float32)


def _augment(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(0, 1))
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def _hwc_to_chw(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2).copy())


class PatchBatches(torch.utils.data.Dataset):
    """Index = global step; item = (lr, hr) batch tensors (N,3,h,w) and (N,3,h*s,w*s)."""

    def __init__(self, data_cfg: dict, scale: int, *, seed: int, rank: int = 0) -> None:
        self.cfg, self.scale, self.seed, self.rank = data_cfg, scale, seed, rank
        self.lr_crop = data_cfg["lr_crop"]
        self.hr_crop = self.lr_crop * scale
        self.paired = data_cfg["lr_dir"] is not None
        hr_paths = sample_photo_paths("train") if data_cfg["hr_dir"] is None else list_images(data_cfg["hr_dir"])
        if not hr_paths:
            raise ParagonError(f"no images (png/jpg/webp/bmp/tif) in {data_cfg['hr_dir']}")
        self.items = self._pairs(hr_paths) if self.paired else [(None, p) for p in hr_paths]
        self._cache: dict[Path, np.ndarray] = {}
        self._check_sizes()

    def _pairs(self, hr_paths: list[Path]) -> list[tuple[Path, Path]]:
        lr_by_stem = {p.stem: p for p in list_images(self.cfg["lr_dir"])}
        missing = [p.name for p in hr_paths if p.stem not in lr_by_stem]
        if missing:
            raise ParagonError(f"paired mode: no LR image in {self.cfg['lr_dir']} for {', '.join(missing[:5])}"
                               + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        return [(lr_by_stem[p.stem], p) for p in hr_paths]

    def _load(self, path: Path) -> np.ndarray:
        if path in self._cache:
            return self._cache[path]
        img = load_image(path)
        if self.cfg["cache"]:
            self._cache[path] = img
        return img

    def _size(self, path: Path) -> tuple[int, int]:
        """(h, w); decodes (and caches) the image when caching, else reads only the header."""
        if self.cfg["cache"]:
            return self._load(path).shape[:2]
        try:
            with Image.open(path) as im:
                return im.size[1], im.size[0]
        except (OSError, SyntaxError, ValueError) as e:
            raise ParagonError(f"cannot read image {path}: {e}") from None

    def _check_sizes(self) -> None:
        keep, small, unreadable = [], [], []
        for lr_p, hr_p in self.items:
            try:
                hr = self._size(hr_p)
                lr = self._size(lr_p) if lr_p is not None else None
            except ParagonError:
                unreadable.append(hr_p.name)
                continue
            if lr is not None and (lr[0] * self.scale > hr[0] or lr[1] * self.scale > hr[1]):
                raise ParagonError(f"paired mode: {hr_p.name} is {hr[1]}x{hr[0]} but its LR "
                                   f"{lr_p.name} is {lr[1]}x{lr[0]} (expected HR = LR x{self.scale})")
            h, w = lr if lr is not None else (hr[0] // self.scale, hr[1] // self.scale)
            if h < self.lr_crop or w < self.lr_crop:
                small.append(f"{hr_p.name} ({hr[1]}x{hr[0]})")
                continue
            keep.append((lr_p, hr_p))
        if unreadable:
            warnings.warn(f"skipping {len(unreadable)} unreadable image(s): {', '.join(unreadable)}", stacklevel=2)
        if small:
            warnings.warn(f"skipping {len(small)} image(s) smaller than the {self.hr_crop}x{self.hr_crop} HR "
                          f"crop: {', '.join(small)}", stacklevel=2)
        if not keep:
            where = self.cfg["hr_dir"] or "the bundled photos"
            raise ParagonError(f"no usable training image in {where} (all unreadable or smaller than "
                               f"{self.hr_crop}x{self.hr_crop})")
        self.items = keep

    def __len__(self) -> int:
        return 1 << 40

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        lr_p, hr_p = self.items[int(rng.integers(len(self.items)))]
        hr = self._load(hr_p)
        c, s = self.lr_crop, self.scale
        if lr_p is not None:
            lr = self._load(lr_p)
            y, x = int(rng.integers(lr.shape[0] - c + 1)), int(rng.integers(lr.shape[1] - c + 1))
            lr_patch, hr_patch = lr[y:y + c, x:x + c], hr[y * s:(y + c) * s, x * s:(x + c) * s]
            if self.cfg["augment"]:
                lr_patch, hr_patch = _augment([lr_patch, hr_patch], rng)
            return lr_patch, hr_patch
        y, x = int(rng.integers(hr.shape[0] - c * s + 1)), int(rng.integers(hr.shape[1] - c * s + 1))
        hr_patch = hr[y:y + c * s, x:x + c * s]
        if self.cfg["augment"]:
            (hr_patch,) = _augment([hr_patch], rng)
        return degrade(hr_patch, s, self.cfg, rng), hr_patch

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        pairs = [self.sample(rng) for _ in range(self.cfg["batch_size"])]
        return _hwc_to_chw([p[0] for p in pairs]), _hwc_to_chw([p[1] for p in pairs])


def batch_loader(ds: PatchBatches, start: int, stop: int, num_workers: int):
    """Yield (step, lr, hr) for steps in [start, stop)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                         persistent_workers=False)
    return zip(range(start, stop), loader)
