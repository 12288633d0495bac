"""Issue 18: the shared numeric options are validated in one layer before any command runs."""

import time

import pytest
from click.testing import CliRunner

from paragon_export.cli import main
from conftest import write_model


@pytest.mark.parametrize("args, flag", [
    (["upscale", "{ck}", "{ck}", "-o", "{out}", "--threads", "-3"], "--threads"),
    (["int8", "{ck}", "-o", "{out}", "--threads", "0"], "--threads"),
    (["int8", "{ck}", "-o", "{out}", "--threads", "-2"], "--threads"),
    (["int8", "{ck}", "-o", "{out}", "--target-psnr", "nan"], "--target-psnr"),
    (["onnx", "{ck}", "-o", "{out}", "--fp16-min-psnr", "nan"], "--fp16-min-psnr"),
    (["parity", "{ck}", "-o", "{out}", "--atol", "-1"], "--atol"),
    (["parity", "{ck}", "-o", "{out}", "--sizes", "0x4"], "--sizes"),
    (["bench", "{ck}", "--runs", "0"], "--runs"),
    (["qat", "{ck}", "-o", "{out}", "--lr", "inf"], "--lr"),
])
def test_bad_option_values_fail_at_once_in_one_line(tmp_path, args, flag):
    ck = write_model(tmp_path / "nano.safetensors")
    t0 = time.time()
    r = CliRunner().invoke(main, [a.format(ck=ck, out=tmp_path / "out") for a in args])
    assert r.exit_code == 2, r.output  # a usage error, before any work
    assert flag in r.output and "Traceback" not in r.output
    assert time.time() - t0 < 20 and not (tmp_path / "out").exists()


def test_parity_sizes_too_small_for_its_metrics_is_one_line(tmp_path):
    ck = write_model(tmp_path / "nano.safetensors")
    r = CliRunner().invoke(main, ["parity", str(ck), "-o", str(tmp_path / "out"), "--sizes", "1x1"])
    assert r.exit_code == 1 and "--sizes" in r.output and ">= 6 px at x2" in r.output, r.output
    assert not (tmp_path / "out").exists()
