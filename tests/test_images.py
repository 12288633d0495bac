"""Issue 18: one image reader for every command: decompression bombs, truncation and EXIF orientation."""

import numpy as np
import png
import pytest
from click.testing import CliRunner
from PIL import Image

from paragon_export.calibration.set import build_calibration_set
from paragon_export.cli import main
from paragon_export.errors import ParagonError
from paragon_export.images import load_image
from paragon_export.picture import image_size, read_picture
from conftest import write_model


@pytest.fixture
def small_bomb_limit(monkeypatch):
    # A 100x100 "bomb" under a 5000-pixel limit behaves as a 100 Mpx file under Pillow's default.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)


def photo(path, w=96, h=80, seed=0, **save):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, **save)
    return path


def test_bombs_are_one_error_in_every_reader(tmp_path, small_bomb_limit):
    bomb = photo(tmp_path / "bomb.png", 100, 100)
    bomb16 = tmp_path / "bomb16.png"
    png.Writer(100, 100, greyscale=False, bitdepth=16).write(open(bomb16, "wb"), np.zeros((100, 300), np.uint16))
    huge = photo(tmp_path / "huge.png", 200, 200)  # above twice the limit: Pillow's own DecompressionBombError
    for p in (bomb, bomb16, huge):
        for reader in (load_image, read_picture, image_size):
            with pytest.raises(ParagonError, match="limit"):
                reader(p)


def test_calibration_skips_a_bomb_as_it_promises(tmp_path, small_bomb_limit):
    folder = tmp_path / "calib"
    folder.mkdir()
    for k in range(3):
        photo(folder / f"ok{k}.png", 64, 64, seed=k)
    photo(folder / "bomb.png", 100, 100)
    cal = build_calibration_set(folder, scale=2, lr_size=(16, 16), eval_size=(16, 16), holdout=0.34)
    assert any("bomb.png" in str(s) for s in cal.skipped)
    # qat --data: the same set, and its training patches skip the bomb too (each file is decoded again).
    from paragon_export.qat_data import PATCHES_PER_IMAGE, train_patches

    patches = train_patches([folder / "bomb.png", folder / "ok0.png"], scale=2, patch=8, seed=0)
    assert len(patches.lr) == PATCHES_PER_IMAGE


def test_upscale_checks_every_input_before_writing_any(tmp_path):
    ckpt = write_model(tmp_path / "nano.safetensors")
    src = tmp_path / "in"
    src.mkdir()
    photo(src / "a.png", 32, 24)
    good = photo(tmp_path / "b.png", 64, 64).read_bytes()
    (src / "b.png").write_bytes(good[: len(good) // 2])  # the header passes, the data is cut short
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["upscale", str(ckpt), str(src), "-o", str(out), "--threads", "1"])
    assert r.exit_code != 0 and "b.png" in r.output and "Traceback" not in r.output
    assert not out.exists() or not any(out.rglob("*.png"))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored landscape, shown portrait
    p = photo(tmp_path / "portrait.jpg", 96, 64, exif=exif.tobytes())
    assert load_image(p).shape[:2] == (96, 64)
    assert image_size(p) == (96, 64) and read_picture(p).rgb.shape[:2] == (96, 64)
