"""Image I/O shared by every command: real photos in, float32 RGB arrays out.

Arrays are HxWx3 float32 in [0, 1]; tensors are 1x3xHxW.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ParagonError
# The file layer (decoders, bomb limit, EXIF, 16-bit) lives in picture; these names are re-exported.
from .picture import Picture, check_pixels, open_image, pixels, read_16bit, rgb_array, write_picture  # noqa: F401

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}

# Real CC0 / public-domain photos shipped inside the scikit-image wheel. EVAL_PHOTOS are never
# used for training the embedded default, so figures on them are held-out figures.
TRAIN_PHOTOS = (
    "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
    "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png", "clock_motion.png",
    "cell.png", "page.png", "text.png",
)
EVAL_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def list_images(folder: Path | str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ParagonError(f"image folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(path: Path | str, *, keep_alpha: bool = False) -> np.ndarray:
    """Decode 8/16-bit gray, RGB, RGBA or palette images to float32 RGB(A) in [0, 1]."""
    path = Path(path)

    pic = read_16bit(path)
    if pic is not None:
        a = pic.rgb if pic.alpha is None or not keep_alpha else np.concatenate([pic.rgb, pic.alpha[..., None]], -1)
        return np.ascontiguousarray(np.clip(a, 0.0, 1.0), dtype=np.float32)
    with open_image(path) as im:
        a = pixels(im)
    return rgb_array(a, keep_alpha=keep_alpha)


def sample_photo_paths(split: str = "all") -> list[Path]:
    names = {"train": TRAIN_PHOTOS, "eval": EVAL_PHOTOS, "all": TRAIN_PHOTOS + EVAL_PHOTOS}[split]
    return [skimage_data_dir() / n for n in names]


def bicubic_downscale(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop HR to a multiple of `scale` and make its bicubic LR (antialiased, as MATLAB imresize).

    Returns (hr_cropped, lr)."""
    h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    hr = hr[:h, :w]
    if scale == 1:
        return hr, hr.copy()
    chans = [Image.fromarray(hr[..., c].astype(np.float32), mode="F").resize((w // scale, h // scale), Image.BICUBIC)
             for c in range(hr.shape[-1])]
    lr = np.stack([np.asarray(c, dtype=np.float32) for c in chans], -1)
    return hr, np.clip(lr, 0.0, 1.0)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    h, w = lr.shape[:2]
    chans = [Image.fromarray(lr[..., c].astype(np.float32), mode="F").resize((w * scale, h * scale), Image.BICUBIC)
             for c in range(lr.shape[-1])]
    return np.clip(np.stack([np.asarray(c, dtype=np.float32) for c in chans], -1), 0.0, 1.0)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].float()


def to_image(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
    return a[0].transpose(1, 2, 0)


def save_image(img: np.ndarray, path: Path | str, *, bits: int = 8) -> None:
    """HxWx3 (or x4 with alpha) float image to a file; 16-bit needs .png or .tif."""
    alpha = img[..., 3] if img.shape[-1] == 4 else None
    write_picture(Picture(img[..., :3], alpha, bits, False), Path(path), suffix=Path(path).suffix)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'64x64,75x131' -> [(64, 64), (75, 131)] as (height, width)."""
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ParagonError(f"bad size list {text!r} (expected HxW[,HxW...])") from None
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ParagonError(f"bad size list {text!r} (expected HxW[,HxW...])")
    return sizes  # type: ignore[return-value]


def lr_hr_crops(paths: list[Path], scale: int, size: tuple[int, int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Centre HR crops of (size*scale) from real photos and their bicubic LR: [(name, lr, hr)]."""
    out = []
    for p in paths:
        img = load_image(p)
        h, w = size[0] * scale, size[1] * scale
        if img.shape[0] < h or img.shape[1] < w:
            continue
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        hr, lr = bicubic_downscale(img[top:top + h, left:left + w], scale)
        out.append((p.stem, lr, hr))
    if not out:
        raise ParagonError(f"no image is large enough for a {size[0]}x{size[1]} LR crop at x{scale}")
    return out
