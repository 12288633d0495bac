"""Calibration sets built from real photos: decoding and validation, deterministic crops, the
held-out split, and the three consumer interfaces (ORT reader, Polygraphy loader, torch loop)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from paragon_export.calibration import build_calibration_set
from paragon_export.errors import ParagonError
from paragon_export.images import load_image, sample_photo_paths

SCALE = 2
CROP = (24, 24)


def _photo_crop(i: int, size: int = 96) -> np.ndarray:
    """A real photo region (uint8 RGB)."""
    img = load_image(sample_photo_paths("train")[i])
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return (img[top:top + size, left:left + size] * 255 + 0.5).astype(np.uint8)


def _write_png16(path, a: np.ndarray) -> None:
    """16-bit RGB PNG (Pillow cannot write one): IHDR bit depth 16, unfiltered rows, zlib."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


KINDS = ("rgb8", "rgb16", "gray8", "rgba", "palette", "jpeg", "gray16", "rgb8")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Eight real-photo files in the formats users have: 8/16-bit RGB, 8/16-bit gray, RGBA, palette, JPEG."""
    d = tmp_path_factory.mktemp("photos")
    for i, kind in enumerate(KINDS):
        a = _photo_crop(i)
        if kind == "rgb8":
            Image.fromarray(a).save(d / f"p{i}_rgb8.png")
        elif kind == "rgb16":
            _write_png16(d / f"p{i}_rgb16.png", a.astype(np.uint16) * 257)
        elif kind == "gray8":
            Image.fromarray(a).convert("L").save(d / f"p{i}_gray.png")
        elif kind == "gray16":
            Image.fromarray(np.asarray(Image.fromarray(a).convert("L"), np.uint16) * 257).save(d / f"p{i}_gray16.png")
        elif kind == "rgba":
            Image.fromarray(np.dstack([a, np.full(a.shape[:2], 200, np.uint8)])).save(d / f"p{i}_rgba.png")
        elif kind == "palette":
            Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE).save(d / f"p{i}_palette.png")
        else:
            Image.fromarray(a).save(d / f"p{i}.jpg", quality=95)
    return d


def _bad_files(d):
    (d / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    full = d / "full.png"
    Image.fromarray(_photo_crop(0)).save(full)
    (d / "truncated.png").write_bytes(full.read_bytes()[:400])
    full.unlink()
    Image.fromarray(_photo_crop(1, 20)).save(d / "tiny.png")


def build(folder, **kw):
    kw = {"scale": SCALE, "lr_size": CROP, "crops_per_image": 3, "batch_size": 2, "eval_size": (32, 32)} | kw
    return build_calibration_set(folder, **kw)


def test_formats_accepted_and_split_by_image(photo_dir):
    c = build(photo_dir)
    used = set(c.calib_images) | {h.name + ".png" for h in c.holdout} | {h.name + ".jpg" for h in c.holdout}
    # every format decoded (16-bit, gray, RGBA, palette included), nothing skipped
    assert not c.skipped
    assert len(c.calib_images) + len(c.holdout) == 8
    assert all(any(u.startswith(f"p{i}_") or u == f"p{i}.jpg" for u in used) for i in range(8))
    assert Image.open(photo_dir / "p6_gray16.png").mode.startswith("I")  # really 16-bit on disk
    # held-out images never contribute calibration crops
    held_stems = {h.name for h in c.holdout}
    assert held_stems and not held_stems & {n.rsplit(".", 1)[0] for n in c.calib_images}
    assert c.crops.shape == (3 * len(c.calib_images), 3, *CROP) and c.crops.dtype == np.float32
    for h in c.holdout:  # HR given -> bicubic LR made, HR kept for ground truth
        assert h.hr.shape == (h.lr.shape[0] * SCALE, h.lr.shape[1] * SCALE, 3)
    assert 0.0 <= c.crops.min() and c.crops.max() <= 1.0


def test_reader_batches_distinct_deterministic_and_rewind(photo_dir):
    c = build(photo_dir)
    first = []
    while (feed := c.get_next()) is not None:
        first.append(feed)
    assert len(first) == len(c) == -(-len(c.crops) // 2)
    arrays = [f["input"] for f in first]
    # distinct content, and fresh arrays (no aliasing between batches or with the set itself)
    assert all(not np.array_equal(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])
    assert len({id(a) for a in arrays}) == len(arrays)
    assert not any(np.shares_memory(a, c.crops) for a in arrays)
    arrays[0][:] = -1.0  # a consumer scribbling on its batch must not change what comes next
    c.rewind()
    again = [c.get_next()["input"] for _ in range(len(c))]
    assert c.get_next() is None
    assert not np.array_equal(again[0], arrays[0])
    np.testing.assert_array_equal(again[1], arrays[1])
    # a second build from the same folder is identical; another seed is not
    d = build(photo_dir)
    assert d.fingerprint == c.fingerprint
    np.testing.assert_array_equal(d.batch(0), again[0])
    assert build(photo_dir, seed=1).fingerprint != c.fingerprint
    assert build(photo_dir, lr_size=(20, 20)).fingerprint != c.fingerprint


def test_set_range_limits_reader(photo_dir):
    c = build(photo_dir)
    c.set_range(1, 3)
    got = [c.get_next() for _ in range(3)]
    assert got[2] is None
    np.testing.assert_array_equal(got[0]["input"], c.batch(1))
    c.rewind()
    np.testing.assert_array_equal(c.get_next()["input"], c.batch(1))


def test_iteration_and_forward_loop(photo_dir):
    # (Polygraphy's Comparator consuming the set is exercised in test_int8.py)
    c = build(photo_dir).with_input_name("lr")
    c.get_next()  # the reader's position must not affect iteration
    feeds = list(c)
    assert len(feeds) == len(c) and set(feeds[0]) == {"lr"}
    np.testing.assert_array_equal(feeds[0]["lr"], c.batch(0))
    assert len(list(c)) == len(c)  # iterable again from the start

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            seen.append(x.clone())
            return x * self.w

    c.forward_loop(Probe())
    assert len(seen) == len(c)
    np.testing.assert_array_equal(seen[-1].numpy(), c.batch(len(c) - 1))


def test_bad_files_are_skipped_with_reasons(photo_dir, tmp_path):
    for f in photo_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _bad_files(tmp_path)
    c = build(tmp_path)
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in c.skipped}
    assert set(reasons) == {"garbage.png", "truncated.png", "tiny.png"}
    assert reasons["garbage.png"].startswith("unreadable")
    assert reasons["truncated.png"].startswith("unreadable")
    assert reasons["tiny.png"].startswith("too small")
    assert len(c.calib_images) + len(c.holdout) == 8
    assert all(str(s) in c.summary()["skipped"] for s in c.skipped)


def test_empty_and_unusable_folders_are_clear_errors(tmp_path):
    with pytest.raises(ParagonError, match="does not exist"):
        build(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ParagonError, match="holds no images"):
        build(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    _bad_files(bad)
    with pytest.raises(ParagonError, match=r"no usable calibration image.*unreadable.*too small|no usable.*too small"):
        build(bad)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.fromarray(_photo_crop(2, 30)).save(tiny / "a.png")
    with pytest.raises(ParagonError, match=r"too small \(30x30 px, needs at least 48x48\)"):
        build(tiny)


def test_one_image_falls_back_to_bundled_holdout(tmp_path):
    Image.fromarray(_photo_crop(3)).save(tmp_path / "only.png")
    c = build(tmp_path)
    assert c.calib_images == ["only.png"]
    assert {h.name for h in c.holdout} == {p.stem for p in sample_photo_paths("eval")}
    assert any("bundled held-out" in n for n in c.notes)


def test_bundled_photos_split_train_eval():
    c = build(None, crops_per_image=1)
    assert set(c.calib_images) == {p.name for p in sample_photo_paths("train")}
    assert {h.name for h in c.holdout} == {p.stem for p in sample_photo_paths("eval")}
