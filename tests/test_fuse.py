import pickle

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from paragon_export.arch import build
from paragon_export.arch.paragonsr2 import LayerScale
from paragon_export.checkpoint import load_model, save_model
from paragon_export.cli import main
from conftest import COMPAT

NANO_GOLDEN = COMPAT / "paragonsr2_e7d0b4cf_nano_x2.safetensors"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res, out_path, pattern):
    assert res.exit_code != 0
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
    assert pattern in lines[0], lines[0]
    assert not out_path.exists()


def traiNNer_file(tmp_path):
    t = load_file(str(NANO_GOLDEN))
    p = tmp_path / "nano.safetensors"
    save_file({"params_ema." + k[11:]: v for k, v in t.items() if k.startswith("state_dict.")}, str(p))
    return p


def test_fuse_cli_report_and_loadback(tmp_path):
    out = tmp_path / "fused.safetensors"
    res = run("fuse", traiNNer_file(tmp_path), "--scale", 2, "-o", out)
    assert res.exit_code == 0, res.output
    assert "exactness" in res.output and "dynamic->static gap" in res.output
    loaded = load_model(out)
    assert loaded.fused and loaded.scale == 2 and loaded.upsampler == "legacy"
    assert not any("kernel_generator" in n for n in loaded.model.state_dict())
    assert not any(isinstance(m, LayerScale) for m in loaded.model.modules())
    t = load_file(str(NANO_GOLDEN))
    with torch.no_grad():
        assert (loaded.model(t["io.input"]) - t["io.out_fused"]).abs().max() <= 1e-5


def test_fuse_refuses_uninitialised_kernels_unless_calibrated(tmp_path):
    ckpt = save_model(build("paragonsr2_nano", scale=2).eval(), tmp_path / "raw.safetensors",
                      variant="paragonsr2_nano").path
    out = tmp_path / "f.safetensors"
    assert_one_line_error(run("fuse", ckpt, "-o", out), out, "never initialised")
    photos = tmp_path / "photos"
    photos.mkdir()
    from paragon_export.images import sample_photo_paths
    import shutil
    for p in sample_photo_paths("train")[:3]:
        shutil.copy(p, photos)
    res = run("fuse", ckpt, "-o", out, "--calibrate-kernels", photos)
    assert res.exit_code == 0, res.output
    assert "kernels calibrated on 3 images" in res.output
    fused = load_model(out).model
    k = fused.body[0].blocks[0].transformer.dwconv.weight
    identity = torch.zeros_like(k)
    identity[:, 0, 1, 1] = 1
    assert not torch.allclose(k, identity)


def test_fuse_bad_inputs_give_one_line_errors(tmp_path):
    out = tmp_path / "o.safetensors"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    assert_one_line_error(run("fuse", corrupt, "-o", out), out, "corrupt or truncated")

    class Evil:
        def __reduce__(self):
            return (eval, ("1+1",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    assert_one_line_error(run("fuse", evil, "-o", out), out, "refusing to unpickle")
    assert_one_line_error(run("fuse", traiNNer_file(tmp_path), "--scale", 2, "--variant", "paragonsr2_tiny", "-o", out),
                          out, "not paragonsr2_tiny")
    ro = tmp_path / "a_file"
    ro.write_text("x")
    bad_out = ro / "o.safetensors"
    assert_one_line_error(run("fuse", traiNNer_file(tmp_path), "--scale", 2, "-o", bad_out), bad_out, "not a folder")
    # A read-only location even for root (CI runs as root, so chmod would not do).
    res = run("fuse", traiNNer_file(tmp_path), "--scale", 2, "-o", "/proc/paragon.safetensors")
    assert res.exit_code != 0 and res.output.startswith("Error:") and "not writable" in res.output


def test_unreadable_and_tiny_images_are_skipped_and_listed(tmp_path):
    # Issue 18: --calibrate-kernels stopped at the first unreadable file and a 1x1 image was a traceback;
    # --hr stopped at the first unreadable file. Now every file is decoded first and the bad ones listed.
    import shutil

    from paragon_export.images import sample_photo_paths

    ckpt = save_model(build("paragonsr2_nano", scale=2).eval(), tmp_path / "raw.safetensors",
                      variant="paragonsr2_nano").path
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sample_photo_paths("eval")[:2]:
        shutil.copy(p, photos)
    (photos / "0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    from PIL import Image

    Image.new("RGB", (1, 1)).save(photos / "1_dot.png")
    out = tmp_path / "f.safetensors"
    res = run("fuse", ckpt, "-o", out, "--calibrate-kernels", photos, "--hr", photos)
    assert res.exit_code == 0, res.output
    assert "kernels calibrated on 2 images" in res.output
    assert "0_broken.png: unreadable" in res.output and "1_dot.png: too small" in res.output
    assert out.is_file()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(photos / "0_broken.png", only_bad)
    assert_one_line_error(run("fuse", ckpt, "-o", tmp_path / "g.safetensors", "--calibrate-kernels", only_bad),
                          tmp_path / "g.safetensors", "0_broken.png: unreadable")
