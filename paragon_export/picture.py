"""Image files with everything a user expects back: alpha, 16-bit depth, gray.

Pillow cannot hold 16-bit RGB(A), so 16-bit PNGs go through pypng and 16-bit TIFFs through tifffile.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ParagonError

OUTPUT_SUFFIXES = {".png", ".tif", ".tiff", ".webp", ".jpg", ".jpeg"}


@dataclass
class Picture:
    rgb: np.ndarray  # HxWx3 float32 in [0, 1]
    alpha: np.ndarray | None  # HxW float32 or None
    bits: int  # 8 or 16
    gray: bool


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None when the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">BB", head[24:26])


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    w, h = struct.unpack(">II", head[16:24])
    return h, w


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the pixels will be read (EXIF orientation applied), from the header only;
    one clear error line for anything unreadable or above the decompression-bomb limit."""
    # Decoder chatter about corrupt files would break the one-line error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as im:
                check_pixels(path, im.height, im.width)
                turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap width and height
                return (im.width, im.height) if turned else (im.height, im.width)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if path.suffix.lower() in (".tif", ".tiff"):  # 16-bit gray+alpha and others Pillow cannot open
                size = _tiff_size(path)
                if size:
                    check_pixels(path, *size)
                    return size
            raise ParagonError(f"cannot read image {path}: {e}") from None


def _tiff_size(path: Path) -> tuple[int, int] | None:
    import logging

    import tifffile

    log = logging.getLogger("tifffile")
    was = log.disabled
    log.disabled = True
    try:
        with tifffile.TiffFile(path) as tf:
            return int(tf.pages[0].imagelength), int(tf.pages[0].imagewidth)
    except Exception:  # tifffile raises many types; the caller reports Pillow's clearer message
        return None
    finally:
        log.disabled = was


def read_16bit(path: Path) -> Picture | None:
    """A 16-bit PNG or TIFF decoded at full depth; None for every other file."""
    try:
        png_head = _png_header(path)
    except OSError as e:
        raise ParagonError(f"cannot read image {path}: {e.strerror}") from None
    if png_head and png_head[0] == 16:
        check_pixels(path, *_png_size(path))  # pypng has no bomb limit of its own
        return _read_png16(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff16(path)
    return None


def read_picture(path: Path | str) -> Picture:
    path = Path(path)
    pic = read_16bit(path)
    if pic is not None:
        return pic
    with open_image(path) as im:
        mode = im.mode
        a = rgb_array(pixels(im), keep_alpha=True)
    gray = mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
    bits = 16 if mode.startswith("I") else 8
    return Picture(a[..., :3], a[..., 3] if a.shape[-1] == 4 else None, bits, gray)


def _split_channels(a: np.ndarray, has_alpha: bool) -> tuple[np.ndarray, np.ndarray | None, bool]:
    a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[..., None]
    alpha = a[..., -1] if has_alpha else None
    color = a[..., :-1] if has_alpha else a
    gray = color.shape[-1] == 1
    rgb = np.repeat(color, 3, -1) if gray else color[..., :3]
    return np.ascontiguousarray(rgb), alpha, gray


def _read_png16(path: Path) -> Picture:
    import png

    try:
        w, h, rows, info = png.Reader(filename=str(path)).asDirect()
        a = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, info["planes"])
    except (png.Error, OSError, ValueError) as e:
        raise ParagonError(f"cannot read image {path}: {e}") from None
    rgb, alpha, gray = _split_channels(a / 65535.0, info["alpha"])
    return Picture(rgb, alpha, 16, gray)


def _read_tiff16(path: Path) -> Picture | None:
    """16-bit TIFFs through tifffile (Pillow cannot hold 16-bit RGB); None for other TIFFs."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            if page.bitspersample != 16:
                return None
            check_pixels(path, int(page.imagelength), int(page.imagewidth))  # before decoding
            a = page.asarray()
            extra = len(page.extrasamples)
    except ParagonError:
        raise
    except Exception as e:  # tifffile raises many types (TiffFileError, codec errors, ValueError)
        raise ParagonError(f"cannot read image {path}: {e}") from None
    if a.ndim == 3 and a.shape[0] in (2, 3, 4) and a.shape[-1] not in (2, 3, 4):  # planar layout
        a = a.transpose(1, 2, 0)
    rgb, alpha, gray = _split_channels(a / 65535.0, extra > 0)
    return Picture(rgb, alpha, 16, gray)


def check_writable_format(path: Path, *, bits: int, alpha: bool) -> None:
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ParagonError(f"{path}: cannot write {suffix!r} images (use {', '.join(sorted(OUTPUT_SUFFIXES))})")
    if bits == 16 and suffix not in (".png", ".tif", ".tiff"):
        raise ParagonError(f"{path}: a 16-bit result needs a .png or .tif output")
    if alpha and suffix in (".jpg", ".jpeg"):
        raise ParagonError(f"{path}: JPEG cannot hold the alpha channel; use .png")


def write_picture(pic: Picture, path: Path, *, suffix: str) -> None:
    """Write to `path` (a temp file) in the format of `suffix`."""
    rgb = np.clip(pic.rgb, 0.0, 1.0)
    color = rgb.mean(-1, keepdims=True) if pic.gray else rgb
    planes = color if pic.alpha is None else np.concatenate([color, np.clip(pic.alpha, 0, 1)[..., None]], -1)
    h, w, c = planes.shape
    suffix = suffix.lower()
    if pic.bits == 16:
        a = (planes * 65535.0 + 0.5).astype(np.uint16)
        if suffix == ".png":
            import png

            writer = png.Writer(w, h, greyscale=pic.gray, alpha=pic.alpha is not None, bitdepth=16)
            with open(path, "wb") as f:
                writer.write(f, a.reshape(h, w * c))
        else:
            import tifffile

            tifffile.imwrite(path, a[..., 0] if c == 1 else a, photometric="minisblack" if pic.gray else "rgb",
                             extrasamples=("unassalpha",) if pic.alpha is not None else None)
        return
    a = (planes * 255.0 + 0.5).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]
    fmt = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}[suffix]
    extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(a[..., 0] if c == 1 else a, mode=mode).save(path, format=fmt, **extra)


def max_pixels() -> int:
    """Pillow's decompression-bomb limit (about 89 Mpx by default), for every reader alike."""
    return int(Image.MAX_IMAGE_PIXELS or 1 << 62)


def check_pixels(path: Path, height: int, width: int) -> None:
    if height * width > max_pixels():
        raise ParagonError(f"cannot read image {path}: {width}x{height} = {height * width / 1e6:.0f} Mpx is above "
                           f"the {max_pixels() / 1e6:.0f} Mpx limit (a decompression bomb, or too large to process)")


@contextlib.contextmanager
def open_image(path: Path | str) -> Iterator[Image.Image]:
    """The one way to open an image with Pillow: header read, size checked against the bomb limit
    before any pixel is decoded, EXIF orientation applied (a portrait phone photo stays upright),
    and every decoder failure (truncation, corrupt data, bombs) one ParagonError."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decoder chatter and DecompressionBombWarning: we check ourselves
        try:
            with Image.open(path) as im:
                check_pixels(path, im.height, im.width)
                im.load()
                yield ImageOps.exif_transpose(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                struct.error, EOFError) as e:
            raise ParagonError(f"cannot read image {path}: {e}") from None


def rgb_array(a: np.ndarray, *, keep_alpha: bool) -> np.ndarray:
    """Gray, gray+alpha, RGB or RGBA pixels -> float32 RGB(A) in [0, 1]."""
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] in (1, 2):  # gray or gray+alpha
        a = np.concatenate([np.repeat(a[..., :1], 3, -1), a[..., 1:]], -1)
    if not keep_alpha:
        a = a[..., :3]
    return np.ascontiguousarray(np.clip(a, 0.0, 1.0), dtype=np.float32)


def pixels(im: Image.Image) -> np.ndarray:
    """Pixels as float32 in [0, 1], keeping 16-bit gray at full depth."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32)
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(im, dtype=np.float32) / 255.0
    return np.asarray(im.convert("RGBA" if "A" in im.mode else "RGB"), dtype=np.float32) / 255.0
