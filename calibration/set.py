"""The calibration set: deterministic LR crops for calibration plus a held-out split for evaluation.

One object serves every consumer:
- ONNX Runtime: it is a `CalibrationDataReader` (`get_next` hands out a fresh array per batch,
  `rewind` starts over, `set_range` limits it to a slice of batches);
- Polygraphy: iterating it yields feed dicts `{input_name: batch}` (always from the start);
- torch / ModelOpt: `forward_loop(model)` runs the model on every batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from paragon_export.errors import ParagonError
from paragon_export.images import bicubic_downscale, sample_photo_paths

from .sources import Decoded, Skipped, decode, folder_paths, require_some

DEFAULT_LR_SIZE = (64, 64)
DEFAULT_EVAL_SIZE = (128, 128)


@dataclass(repr=False)
class HeldOut:
    name: str
    lr: np.ndarray  # HxWx3 float32
    hr: np.ndarray | None  # (H*scale)x(W*scale)x3, None when the images were given as LR


@dataclass
class CalibrationSet(CalibrationDataReader):
    crops: np.ndarray = field(repr=False)  # N x 3 x h x w float32 (LR)
    holdout: list[HeldOut] = field(repr=False)
    params: dict
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calib_images: list[str] = field(default_factory=list)
    input_name: str = "input"

    def __post_init__(self) -> None:
        self.batch_size = int(self.params["batch_size"])
        self._range = (0, len(self))
        self._pos = 0
        self.served = 0  # batches handed out through get_next, ever (shows whether collection ran)
        self._fingerprint: str | None = None

    # ---------------------------------------------------------------- shared
    def __len__(self) -> int:
        return -(-len(self.crops) // self.batch_size)

    def batch(self, index: int) -> np.ndarray:
        """Batch `index` as a new array (callers may keep or modify it)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.crops[index * self.batch_size:(index + 1) * self.batch_size].copy()

    @property
    def fingerprint(self) -> str:
        """sha256 over the parameters and the decoded pixels of every crop and held-out image."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode())
            h.update(np.ascontiguousarray(self.crops).tobytes())
            for item in self.holdout:
                h.update(item.name.encode())
                h.update(np.ascontiguousarray(item.lr).tobytes())
                if item.hr is not None:
                    h.update(np.ascontiguousarray(item.hr).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def with_input_name(self, name: str) -> "CalibrationSet":
        self.input_name = name
        return self

    # ---------------------------------------------------------------- ONNX Runtime reader
    def get_next(self) -> dict | None:
        if self._pos >= self._range[1]:
            return None
        feed = {self.input_name: self.batch(self._pos)}
        self._pos += 1
        self.served += 1
        return feed

    def rewind(self) -> None:
        self._pos = self._range[0]

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (max(0, start_index), min(len(self), end_index))
        self._pos = self._range[0]

    # ---------------------------------------------------------------- Polygraphy data loader
    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield {self.input_name: self.batch(i)}

    # ---------------------------------------------------------------- torch / ModelOpt
    def forward_loop(self, model) -> None:
        import torch

        device = next(iter(model.parameters()), torch.empty(0)).device
        with torch.no_grad():
            for i in range(len(self)):
                model(torch.from_numpy(self.batch(i)).to(device))

    def summary(self) -> dict:
        return {
            "source": self.params["source"],
            "fingerprint": self.fingerprint,
            "calibration_images": len(self.calib_images),
            "crops": int(len(self.crops)),
            "batches": len(self),
            "holdout_images": [h.name for h in self.holdout],
            "skipped": [str(s) for s in self.skipped],
            "notes": list(self.notes),
            "params": dict(self.params),
        }


def _seed_for(seed: int, name: str) -> np.random.Generator:
    # Keyed by file name, so adding or removing one image does not move the other images' crops.
    return np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)])


def _crops(d: Decoded, *, scale: int, hr: bool, size: tuple[int, int], count: int, seed: int) -> list[np.ndarray]:
    """`count` seeded LR crops of `size`; from HR input, a random HR patch and its bicubic LR."""
    f = scale if hr else 1
    rng = _seed_for(seed, d.path.name)
    out = []
    for _ in range(count):
        top = int(rng.integers(0, d.image.shape[0] // f - size[0] + 1)) * f
        left = int(rng.integers(0, d.image.shape[1] // f - size[1] + 1)) * f
        patch = d.image[top:top + size[0] * f, left:left + size[1] * f]
        lr = bicubic_downscale(patch, scale)[1] if hr else patch
        out.append(np.ascontiguousarray(lr.transpose(2, 0, 1)))
    return out


def _held_out(d: Decoded, *, scale: int, hr: bool, size: tuple[int, int]) -> HeldOut:
    """Centre crop of at most `size` LR pixels; with HR input, its bicubic LR and the HR crop."""
    img = d.image
    f = scale if hr else 1
    h = min(size[0] * f, (img.shape[0] // f) * f)
    w = min(size[1] * f, (img.shape[1] // f) * f)
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    crop = img[top:top + h, left:left + w]
    if not hr:
        return HeldOut(d.path.stem, np.ascontiguousarray(crop), None)
    hr_crop, lr = bicubic_downscale(crop, scale)
    return HeldOut(d.path.stem, lr, np.ascontiguousarray(hr_crop))


@dataclass
class _Image:
    name: str
    crops: list[np.ndarray]
    held_out: HeldOut


def _scan(paths: list[Path], *, limit: int, **kw) -> tuple[list[_Image], list[Skipped]]:
    """Decode up to `limit` usable images, one at a time, keeping only their crops (memory stays small)."""
    images: list[_Image] = []
    skipped: list[Skipped] = []
    for p in paths:
        if len(images) >= limit:
            break
        d = decode(p, min_hw=kw["min_hw"])
        if isinstance(d, Skipped):
            skipped.append(d)
            continue
        images.append(_Image(d.path.name, _crops(d, scale=kw["scale"], hr=kw["hr"], size=kw["lr_size"],
                                                 count=kw["crops_per_image"], seed=kw["seed"]),
                             _held_out(d, scale=kw["scale"], hr=kw["hr"], size=kw["eval_size"])))
    return images, skipped


def build_calibration_set(folder: Path | str | None = None, *, scale: int, lr_size: tuple[int, int] = DEFAULT_LR_SIZE,
                          crops_per_image: int = 4, batch_size: int = 2, seed: int = 0, holdout: float = 0.25,
                          eval_size: tuple[int, int] = DEFAULT_EVAL_SIZE, max_images: int = 64,
                          hr: bool = True) -> CalibrationSet:
    """Calibration crops and a held-out split from an image folder, or from the bundled photos.

    `hr=True`: the images are high-resolution; LR is made by bicubic downscaling, and held-out images
    keep their HR crop for Y-PSNR against ground truth. The split is by image, so no held-out image
    contributes a calibration crop. The bundled photos split into their train and eval sets. A folder
    with more than `max_images` usable images is sampled (seeded) down to that many."""
    if scale < 1 or min(lr_size) < 4 or min(eval_size) < 4 or crops_per_image < 1 or batch_size < 1 or max_images < 1:
        raise ParagonError("calibration needs scale >= 1, crop and eval sizes >= 4 px, >= 1 crop per image, "
                           "batch size >= 1 and max images >= 1")
    if not 0.0 <= holdout < 1.0:
        raise ParagonError(f"held-out fraction must be in [0, 1), got {holdout}")
    f = scale if hr else 1
    kw = dict(min_hw=(lr_size[0] * f, lr_size[1] * f), scale=scale, hr=hr, lr_size=tuple(lr_size),
              crops_per_image=crops_per_image, seed=seed, eval_size=tuple(eval_size))
    notes: list[str] = []
    if folder is None:
        source = "bundled sample photos"
        calib, skipped = _scan(sample_photo_paths("train"), limit=max_images, **kw)
        held, skipped_eval = _scan(sample_photo_paths("eval"), limit=max_images, **kw)
        skipped += skipped_eval
        require_some(calib, skipped, source)
    else:
        source = str(folder)
        paths = folder_paths(folder)
        order = np.random.default_rng(seed).permutation(len(paths))
        images, skipped = _scan([paths[i] for i in order], limit=max_images, **kw)
        require_some(images, skipped, source)
        if len(images) >= max_images and len(paths) > len(images) + len(skipped):
            notes.append(f"used {len(images)} of {len(paths)} images (seeded choice, max_images={max_images})")
        images.sort(key=lambda im: im.name)
        calib, held = _split(images, holdout, seed)
        if holdout > 0 and not held:
            held, _ = _scan(sample_photo_paths("eval"), limit=max_images, **kw)
            notes.append("only one usable image: evaluating on the bundled held-out photos instead")
    crops = [c for im in calib for c in im.crops]
    # Every batch has the same shape (ORT's histogram calibrators stack them): drop the remainder.
    batch_size = min(batch_size, len(crops))
    if len(crops) % batch_size:
        notes.append(f"dropped {len(crops) % batch_size} crops to make whole batches of {batch_size}")
        crops = crops[:len(crops) - len(crops) % batch_size]
    params = {"source": source, "scale": scale, "lr_size": list(lr_size), "crops_per_image": crops_per_image,
              "batch_size": batch_size, "seed": seed, "holdout": holdout, "eval_size": list(eval_size),
              "max_images": max_images, "hr": hr}
    return CalibrationSet(crops=np.stack(crops).astype(np.float32),
                          holdout=[im.held_out for im in held], params=params, skipped=skipped, notes=notes,
                          calib_images=[im.name for im in calib])


def _split(images: list[_Image], holdout: float, seed: int) -> tuple[list[_Image], list[_Image]]:
    n = len(images)
    n_held = min(n - 1, max(1, round(holdout * n))) if holdout > 0 and n >= 2 else 0
    held_idx = set(np.random.default_rng(seed).permutation(n)[:n_held].tolist())
    return ([im for i, im in enumerate(images) if i not in held_idx],
            [im for i, im in enumerate(images) if i in held_idx])
