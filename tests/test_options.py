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
    (["qat", "{ck}", "-o", "{out}", "--eval-size", "0x4"], "--eval-size"),
    (["int8", "{ck}", "-o", "{out}", "--crop", "big"], "--crop"),
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


def test_int8_and_qat_options_reach_the_api_as_one_recipe(tmp_path, monkeypatch):
    """The shared option declarations (cli/options.py) pack into the recipe the API call gets."""
    import paragon_export.int8 as int8
    import paragon_export.qat as qat
    from paragon_export.errors import ParagonError
    from paragon_export.int8_recipe import Int8Recipe
    from paragon_export.qat_recipe import QATRecipe

    seen = {}

    def stop(name):
        def api(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise ParagonError("stopped before any work")
        return api

    monkeypatch.setattr(int8, "quantize_int8", stop("int8"))
    monkeypatch.setattr(qat, "qat", stop("qat"))
    ck = write_model(tmp_path / "nano.safetensors")
    r = CliRunner().invoke(main, ["int8", str(ck), "-o", str(tmp_path / "a"), "--method", "entropy", "--crop", "32x48",
                                  "--max-drop", "0.2", "--no-bias-correction", "--seed", "3", "--threads", "2"])
    assert r.exit_code == 1 and "stopped before any work" in r.output, r.output
    args, kwargs = seen["int8"]
    assert args[2] == Int8Recipe(method="entropy", lr_size=(32, 48), max_drop=0.2, bias_correction=False, seed=3)
    assert kwargs["threads"] == 2 and kwargs["force"] is False
    # --max-drop -1 disables the drop limit, as its help says (calibration photos without HR ground truth)
    r = CliRunner().invoke(main, ["int8", str(ck), "-o", str(tmp_path / "a"), "--max-drop", "-1", "--target-psnr", "40"])
    assert r.exit_code == 1 and "stopped before any work" in r.output, r.output
    assert seen["int8"][0][2] == Int8Recipe(max_drop=None, target_psnr=40.0)
    r = CliRunner().invoke(main, ["qat", str(ck), "-o", str(tmp_path / "q"), "--steps", "7", "--eval-size", "40x40",
                                  "--holdout", "0.5", "--seed", "3", "--magic", "float"])
    assert r.exit_code == 1 and "stopped before any work" in r.output, r.output
    args, kwargs = seen["qat"]
    assert args[2] == QATRecipe(steps=7, eval_size=(40, 40), holdout=0.5, seed=3, magic="float")
    assert callable(kwargs["progress"]) and kwargs["threads"] == 1
