"""Issue 18 item 7: a command that allocates from user-given sizes estimates the memory first and
refuses in one line (bench --sizes 5000x5000 grew to 19.5 GB and was OOM-killed)."""

import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from paragon_export import memory
from paragon_export.bench import bench
from paragon_export.cli import main
from conftest import export_onnx_file, make_model, write_model

BUDGET = 4 << 30  # what the tests pretend is available, whatever this machine has


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    ckpt = write_model(d / "nano.safetensors")
    onnx_file = export_onnx_file(make_model(fused=True), d / "nano_fp32.onnx", scale=2)
    return {"ckpt": ckpt, "onnx": onnx_file, "dir": d}


def _one_line(r, *needles):
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    for n in needles:
        assert n in r.output, r.output


def test_huge_sizes_are_refused_before_anything_runs(arts, monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "available_bytes", lambda: BUDGET)
    for art in (arts["onnx"], arts["ckpt"]):
        t0 = time.time()
        r = CliRunner().invoke(main, ["bench", str(art), "--sizes", "64x64,5000x5000", "--runs", "1", "--threads", "1",
                                      "--json", str(tmp_path / "b.json")])
        _one_line(r, f"bench of {art.name} at 5000x5000 needs an estimated", "GiB of memory, more than the 4.0 GiB")
        assert time.time() - t0 < 30 and not (tmp_path / "b.json").exists()
    r = CliRunner().invoke(main, ["parity", str(arts["ckpt"]), str(arts["onnx"]), "-o", str(tmp_path / "p"),
                                  "--sizes", "24x24,5000x5000"])
    _one_line(r, "parity of", "at 5000x5000 needs an estimated")
    assert not (tmp_path / "p").exists()
    # An untiled upscale of a large image (under the decompression-bomb limit) is refused; tiled it fits.
    big = tmp_path / "big.png"
    Image.new("RGB", (4000, 3000)).save(big)
    r = CliRunner().invoke(main, ["upscale", str(arts["onnx"]), str(big), "-o", str(tmp_path / "up"), "--tile", "0"])
    _one_line(r, "upscale of big.png (4000x3000 px, --tile 0) needs an estimated")
    fp = memory.footprint(arts["onnx"])
    assert memory.upscale_bytes(fp, (3000, 4000), 256) < BUDGET < memory.upscale_bytes(fp, (3000, 4000), 0)


def test_small_sizes_still_run_under_the_same_budget(arts, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: BUDGET)
    report = bench([arts["onnx"]], sizes=[(32, 32)], threads=1, runs=1, warmup=0)
    assert report.results[0].size == "32x32"


def test_estimate_bounds_the_measured_peak(arts):
    """The estimate is an upper bound of bench's measured peak (real runs) and grows with the pixel
    count like the measurement does, not orders of magnitude faster."""
    sizes = [(128, 128), (256, 256)]
    before = torch.get_num_threads()
    try:
        for art in (arts["onnx"], arts["ckpt"]):
            fp = memory.footprint(art)
            assert fp.scale == 2 and fp.values_per_pixel > 3 * (1 + 4)
            measured = [bench([art], sizes=[s], threads=1, runs=1, warmup=0).results[0].peak_rss_mib * 2**20
                        for s in sizes]
            est = [fp.bytes_at(s) for s in sizes]
            assert all(e >= m for e, m in zip(est, measured)), (art.name, est, measured)
            slope_est, slope_meas = est[1] - est[0], measured[1] - measured[0]
            assert 0 < slope_meas and slope_est < 4 * slope_meas, (art.name, slope_est, slope_meas)
    finally:
        torch.set_num_threads(before)


def test_unprobeable_files_leave_the_error_to_their_command(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert memory.footprint(junk) is None and memory.footprint(tmp_path / "missing.safetensors") is None
    memory.check_fits("anything", None, 1)  # nothing to estimate: no refusal
    with pytest.raises(Exception, match="needs an estimated 2.0 GiB of memory, more than the 1.0 GiB"):
        memory.check_fits("anything", 2 << 30, 1 << 30)
    assert np.isfinite(memory.available_bytes() or 0)
