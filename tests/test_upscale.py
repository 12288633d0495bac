"""`upscale`: tiled == untiled, alpha / 16-bit / gray kept, folders, ONNX fp32 and fp16-I/O, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import png
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from paragon_export.checkpoint import load_model
from paragon_export.cli import main
from paragon_export.errors import ParagonError
from paragon_export.images import bicubic_downscale, bicubic_upscale, load_image, sample_photo_paths
from paragon_export.upscale import open_model, tile_profile, tile_starts, upscale_array

from conftest import export_onnx_file, make_model, write_model

TILE, OVERLAP = 56, 24  # 72x100 LR -> 2x3 tiles


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """72x100 LR crop of a real photo, bicubic-downscaled so it holds more than 8 bits of detail."""
    hr = load_image(sample_photo_paths("eval")[1])[60:204, 100:300]  # chelsea
    return bicubic_downscale(hr, 2)[1]


def seeded(**kw):
    # make_model seeds gammas and kernels only; conv weights come from the global generator.
    torch.manual_seed(kw.get("seed", 0))
    return make_model(**kw)


def torch_fn(model):
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return run


def seam_mask(length: int, starts: list[int], tile: int, scale: int, band: int) -> np.ndarray:
    """HR rows/cols within `band` LR pixels of an inner tile edge."""
    m = np.zeros(length * scale, bool)
    for s in starts:
        for edge in (s, s + tile):
            if 0 < edge < length:
                m[max(0, (edge - band) * scale):(edge + band) * scale] = True
    return m


def test_tile_layout_and_blend_weights():
    for length, tile, overlap in ((100, 56, 24), (181, 100, 20), (300, 64, 16), (57, 56, 24)):
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        total = np.zeros(length * 2)
        for s in starts:
            w = tile_profile(s, tile, length, overlap, 2)
            total[s * 2:(s + tile) * 2] += w
            # Nothing is taken from within overlap/4 of an inner tile edge (the padding's reach).
            guard = overlap // 4 * 2
            if s > 0:
                assert not w[:guard].any()
            if s + tile < length:
                assert not w[-guard:].any()
        assert total.min() > 0.5  # every output pixel has a tile that weighs it fully or nearly
    # Neighbours overlapping by exactly `overlap` crossfade with weights summing to one.
    a, b = tile_profile(0, 64, 112, 16, 3), tile_profile(48, 64, 112, 16, 3)
    assert np.allclose(a[48 * 3:] + b[:16 * 3], 1.0)


@pytest.mark.parametrize("upsampler", ["mks2021", "pixelshuffle"])
def test_tiled_equals_untiled(photo, upsampler):
    fn = torch_fn(seeded(upsampler=upsampler, seed=3))
    whole = upscale_array(fn, photo, scale=2, tile=0, overlap=0)
    tiled = upscale_array(fn, photo, scale=2, tile=TILE, overlap=OVERLAP)
    err = np.abs(tiled - whole)
    h, w = photo.shape[:2]
    seams = seam_mask(h, tile_starts(h, TILE, OVERLAP), TILE, 2, 2)[:, None] | \
        seam_mask(w, tile_starts(w, TILE, OVERLAP), TILE, 2, 2)[None, :]
    print(f"{upsampler}: tiled vs whole max {err.max():.2e}, at tile borders {err[seams].max():.2e}")
    assert err.max() < 1e-4  # everywhere, image borders included
    # Without overlap the error sits at the tile borders: the check above can fail.
    cut = np.abs(upscale_array(fn, photo, scale=2, tile=TILE, overlap=0) - whole)
    starts_h, starts_w = tile_starts(h, TILE, 0), tile_starts(w, TILE, 0)
    seams0 = seam_mask(h, starts_h, TILE, 2, 8)[:, None] | seam_mask(w, starts_w, TILE, 2, 8)[None, :]
    print(f"{upsampler}: no overlap, at tile borders max {cut[seams0].max():.2e}, elsewhere {cut[~seams0].max():.2e}")
    assert cut[seams0].max() > 1e-2
    assert cut[~seams0].max() < 1e-3


def write_png16(path: Path, a: np.ndarray) -> None:
    h, w, c = a.shape
    png.Writer(w, h, greyscale=False, alpha=c == 4, bitdepth=16).write(
        open(path, "wb"), (np.clip(a, 0, 1) * 65535 + 0.5).astype(np.uint16).reshape(h, -1))


def read_png16(path: Path) -> tuple[np.ndarray, dict]:
    w, h, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, info["planes"]), info


def test_folder_alpha_16bit_gray(tmp_path, photo):
    ckpt = write_model(tmp_path / "nano.safetensors", seed=5)
    fn = torch_fn(load_model(ckpt).model)
    src = tmp_path / "in"
    (src / "deep" / "er").mkdir(parents=True)
    h, w = photo.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    alpha = np.clip(1.5 - np.hypot(yy - h / 2, xx - w / 2) / 25, 0, 1).astype(np.float32)
    rgba8 = (np.dstack([photo, alpha]) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(rgba8, "RGBA").save(src / "sprite.png")
    write_png16(src / "deep" / "photo16.png", photo)
    Image.fromarray((photo.mean(-1) * 255 + 0.5).astype(np.uint8), "L").save(src / "deep" / "er" / "gray.jpg")
    (src / "notes.txt").write_text("not an image; ignored in folders")

    out = tmp_path / "out"
    args = ["upscale", str(ckpt), str(src), "-o", str(out), "--tile", str(TILE), "--overlap", str(OVERLAP),
            "--threads", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    # (.paragon-export.json is the ledger of what the toolkit wrote, which --force may replace)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and p.name != ".paragon-export.json") == \
        ["deep/er/gray.png", "deep/photo16.png", "sprite.png"]

    # 16-bit in -> 16-bit out, with more than 8 bits of precision (8-bit output would be off by ~1e-3).
    a16, info = read_png16(out / "deep" / "photo16.png")
    assert info["bitdepth"] == 16 and a16.shape == (2 * h, 2 * w, 3)
    x16 = read_png16(src / "deep" / "photo16.png")[0] / 65535.0
    ref = np.clip(upscale_array(fn, x16.astype(np.float32), scale=2, tile=0, overlap=0), 0, 1)
    assert np.abs(a16 / 65535.0 - ref).max() < 1e-4
    inner = a16[(a16 > 0) & (a16 < 65535)]
    assert (inner % 257 != 0).mean() > 0.9  # not 8-bit values scaled up

    # RGBA: colour through the model, alpha bicubic.
    with Image.open(out / "sprite.png") as im:
        assert im.mode == "RGBA" and im.size == (2 * w, 2 * h)
        got = np.asarray(im, np.float32) / 255
    x8 = rgba8.astype(np.float32) / 255
    ref = np.clip(upscale_array(fn, x8[..., :3], scale=2, tile=0, overlap=0), 0, 1)
    assert np.abs(got[..., :3] - ref).max() <= 0.5 / 255 + 1e-4
    ref_alpha = bicubic_upscale(x8[..., 3:], 2)[..., 0]
    assert np.abs(got[..., 3] - ref_alpha).max() <= 0.5 / 255 + 1e-4
    assert got[..., 3].min() == 0 and got[..., 3].max() == 1

    with Image.open(out / "deep" / "er" / "gray.png") as im:
        assert im.mode == "L" and im.size == (2 * w, 2 * h)

    # Existing outputs are kept without --force, replaced with it; --alpha model runs alpha as gray.
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "already exists (and 2 more)" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["upscale", str(ckpt), str(src / "sprite.png"), "-o", str(out / "sprite.png"),
                                  "--alpha", "model", "--tile", "0", "--threads", "1", "--force"])
    assert r.exit_code == 0, r.output
    with Image.open(out / "sprite.png") as im:
        got_model = np.asarray(im, np.float32)[..., 3] / 255
    ref_model = np.clip(upscale_array(fn, np.repeat(x8[..., 3:], 3, -1), scale=2, tile=0, overlap=0).mean(-1), 0, 1)
    assert np.abs(got_model - ref_model).max() <= 0.5 / 255 + 1e-4
    assert np.abs(got_model - ref_alpha).max() > 0.02
    assert not list(out.rglob(".*.tmp"))


def test_onnx_fp32_and_fp16_io(tmp_path, photo):
    fused = seeded(seed=7, fused=True)
    whole = upscale_array(torch_fn(fused), photo, scale=2, tile=0, overlap=0)
    with_meta = export_onnx_file(fused, tmp_path / "with_scale.onnx", scale=2)
    with open_model(with_meta, threads=1) as m:
        assert m.scale == 2 and m.kind == "onnxruntime"
        tiled = upscale_array(m, photo, scale=m.scale, tile=TILE, overlap=OVERLAP, min_hw=m.min_hw, max_hw=m.max_hw)
    assert np.abs(tiled - whole).max() < 1e-4

    # No metadata: the scale is found by running a small input. fp16 I/O: inputs are cast.
    from onnxconverter_common import float16

    plain = onnx.load(str(export_onnx_file(fused, tmp_path / "plain.onnx", scale=None)))
    half = float16.convert_float_to_float16(plain, keep_io_types=False)
    onnx.save(half, str(tmp_path / "fp16.onnx"))
    with open_model(tmp_path / "fp16.onnx", threads=1) as m:
        assert m.scale == 2 and m.input_dtype == np.float16
        out = upscale_array(m, photo, scale=m.scale, tile=TILE, overlap=OVERLAP)
    with pytest.raises(ParagonError, match="upscales x2, not x3"):
        with open_model(tmp_path / "fp16.onnx", threads=1, scale=3):
            pass
    assert out.dtype == np.float32 and 1e-5 < np.abs(out - whole).max() < 1e-2

    Image.fromarray((photo * 255 + 0.5).astype(np.uint8)).save(tmp_path / "cat.webp", lossless=True)
    r = CliRunner().invoke(main, ["upscale", str(tmp_path / "plain.onnx"), str(tmp_path / "cat.webp"),
                                  "-o", str(tmp_path / "o"), "--tile", "0", "--threads", "1"])
    assert r.exit_code == 0, r.output  # a file into a folder: written as <stem>.png
    with Image.open(tmp_path / "o" / "cat.png") as im:
        assert im.size == (200, 144)
        got = np.asarray(im, np.float32) / 255
    x8 = np.round(photo * 255) / 255
    ref = np.clip(upscale_array(torch_fn(fused), x8.astype(np.float32), scale=2, tile=0, overlap=0), 0, 1)
    assert np.abs(got - ref).max() <= 0.5 / 255 + 1e-4


def test_errors_are_one_line(tmp_path, photo):
    ckpt = write_model(tmp_path / "nano.safetensors")
    img = tmp_path / "ok.png"
    Image.fromarray((photo * 255).astype(np.uint8)).save(img)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # A legacy-head checkpoint without metadata (as traiNNer-redux writes them): its scale is unknown.
    from safetensors.torch import save_file

    golden = tmp_path / "trainner_legacy.safetensors"
    save_file({k: v.contiguous() for k, v in make_model(upsampler="legacy").state_dict().items()}, str(golden))
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 64)
    import onnx
    from onnx import helper

    gray = tmp_path / "gray.onnx"  # a foreign 1-channel model
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(gray))
    cases = [
        ([str(gray), str(img), "-o", str(tmp_path / "o")], "expected a 1x3xHxW input"),
        ([str(ckpt), str(bad), "-o", str(tmp_path / "o")], "cannot read image"),
        ([str(engine), str(img), "-o", str(tmp_path / "o")], "TensorRT"),
        ([str(tmp_path / "model.xyz"), str(img), "-o", str(tmp_path / "o")], "unknown artifact type"),
        ([str(ckpt), str(img), "-o", str(tmp_path / "o"), "--tile", "32", "--overlap", "16"], "less than half"),
        ([str(ckpt), str(tmp_path / "nope.png"), "-o", str(tmp_path / "o")], "does not exist"),
        ([str(ckpt), str(img), "-o", str(tmp_path / "x.jpg")], None),  # works: 8-bit RGB to JPEG
        ([str(golden), str(img), "-o", str(tmp_path / "o")], "pass --scale"),
        ([str(golden), str(img), "-o", str(tmp_path / "g.png"), "--scale", "2", "--tile", "0"], None),
        ([str(ckpt), str(img), "-o", str(tmp_path / "o"), "--scale", "3"], "contradictory scale"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, ["upscale", *args, "--threads", "1"])
        if message is None:
            assert r.exit_code == 0, r.output
            continue
        assert r.exit_code == 1, (args, r.output)
        assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_unwritable_image_name_is_an_error_not_a_folder(tmp_path, photo):
    # Issue 18 item 8: `-o out.gif` silently became a folder out.gif/ holding a PNG.
    ckpt = write_model(tmp_path / "nano.safetensors")
    img = tmp_path / "ok.png"
    Image.fromarray((photo[:24, :32] * 255).astype(np.uint8)).save(img)
    for name in ("out.gif", "out.bmp"):
        r = CliRunner().invoke(main, ["upscale", str(ckpt), str(img), "-o", str(tmp_path / name), "--threads", "1"])
        assert r.exit_code == 1 and f"cannot write '.{name.split('.')[1]}' images" in r.output, r.output
        assert not (tmp_path / name).exists()


def test_upscale_output_keeps_the_exif_orientation(tmp_path, photo):
    # Issue 18 item 8: a portrait phone JPEG (stored landscape + EXIF "rotate 90") came out sideways.
    ckpt = write_model(tmp_path / "nano.safetensors")
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    src = tmp_path / "portrait.jpg"
    Image.fromarray((photo[:24, :40] * 255).astype(np.uint8)).save(src, exif=exif.tobytes(), quality=98)
    upright = tmp_path / "upright.png"  # the same decoded pixels, turned as a viewer shows them
    Image.fromarray(np.rot90(np.asarray(Image.open(src).convert("RGB")), -1)).save(upright)
    outs = tmp_path / "outs"
    r = CliRunner().invoke(main, ["upscale", str(ckpt), str(src), str(upright), "-o", str(outs), "--threads", "1"])
    assert r.exit_code == 0, r.output
    got, want = np.asarray(Image.open(outs / "portrait.png")), np.asarray(Image.open(outs / "upright.png"))
    assert got.shape[:2] == (80, 48) and np.array_equal(got, want)


def test_foreign_classifier_onnx_is_one_line_in_upscale_and_bench(tmp_path, photo):
    # Issue 18 item 6: a classifier (image in, [N, classes] out) was an IndexError traceback in both.
    from onnx import helper, numpy_helper

    clf = tmp_path / "classifier.onnx"
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 10])
    w = numpy_helper.from_array(np.ones((3, 10), np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]),
              str(clf))
    img = tmp_path / "ok.png"
    Image.fromarray((photo[:24, :32] * 255).astype(np.uint8)).save(img)
    for args in (["upscale", str(clf), str(img), "-o", str(tmp_path / "o"), "--threads", "1"],
                 ["bench", str(clf), "--sizes", "16x16", "--runs", "1", "--threads", "1"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and "input gave [1, 10], not an image upscale" in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1
    gray = tmp_path / "gray.onnx"  # a 1-channel model in bench (upscale: test_errors_are_one_line)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(gray))
    r = CliRunner().invoke(main, ["bench", str(gray), "--sizes", "16x16", "--runs", "1", "--threads", "1"])
    assert r.exit_code == 1 and "expected a 1x3xHxW input" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
