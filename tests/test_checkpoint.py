import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from paragon_export.checkpoint import load_model, read_state_dict, save_model
from paragon_export.errors import ParagonError
from conftest import COMPAT, make_model

NANO_GOLDEN = COMPAT / "paragonsr2_e7d0b4cf_nano_x2.safetensors"


def golden_sd():
    return {k[len("state_dict."):]: v for k, v in load_file(str(NANO_GOLDEN)).items() if k.startswith("state_dict.")}


def test_roundtrip_records_scale_and_metadata(tmp_path):
    m = make_model(scale=3, upsampler="legacy")
    art = save_model(m, tmp_path / "m.safetensors", variant="paragonsr2_nano")
    assert art.meta["scale"] == "3" and art.meta["fused"] == "false"
    loaded = load_model(art.path)  # no --scale needed for our own files
    assert (loaded.variant, loaded.scale, loaded.upsampler, loaded.fused) == ("paragonsr2_nano", 3, "legacy", False)
    x = torch.rand(1, 3, 12, 17)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), m(x))
    with pytest.raises(ParagonError, match="already exists"):
        save_model(m, art.path, variant="paragonsr2_nano")


def test_same_model_saves_to_the_same_bytes(tmp_path):
    # safetensors' own metadata order is random per save; caches and the release manifest key on sha256.
    m = make_model()
    blobs = {save_model(m, tmp_path / f"{i}.safetensors", variant="paragonsr2_nano").path.read_bytes()
            for i in range(6)}
    assert len(blobs) == 1
    loaded = load_model(tmp_path / "0.safetensors")
    assert loaded.variant == "paragonsr2_nano" and loaded.scale == 2


@pytest.mark.parametrize("wrapper", ["params_ema", "params", "state_dict"])
def test_traiNNer_wrappers_and_module_prefix(tmp_path, wrapper):
    sd = golden_sd()
    p = tmp_path / "w.safetensors"
    save_file({f"{wrapper}.module.{k}": v for k, v in sd.items()}, str(p))
    loaded = load_model(p, scale=2)
    assert loaded.variant == "paragonsr2_nano" and loaded.scale == 2
    pth = tmp_path / "w.pth"
    torch.save({wrapper: {f"module.{k}": v for k, v in sd.items()}}, pth)
    assert load_model(pth, scale=2).variant == "paragonsr2_nano"


def test_params_ema_preferred_over_params(tmp_path):
    sd = golden_sd()
    other = {k: v.clone() for k, v in sd.items()}
    other["conv_in.bias"] += 1
    p = tmp_path / "both.safetensors"
    save_file({**{f"params.{k}": v for k, v in other.items()}, **{f"params_ema.{k}": v for k, v in sd.items()}}, str(p))
    assert torch.equal(load_model(p, scale=2).model.conv_in.bias, sd["conv_in.bias"])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"conv_in.weight": Evil()}, f)
    with pytest.raises(ParagonError, match="refusing to unpickle"):
        read_state_dict(p)
    assert "pwned" not in capsys.readouterr().out


def test_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ParagonError, match="corrupt or truncated"):
        read_state_dict(bad)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(NANO_GOLDEN.read_bytes()[:5000])
    with pytest.raises(ParagonError, match="corrupt or truncated"):
        read_state_dict(trunc)
    with pytest.raises(ParagonError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_key_problems_are_named(tmp_path):
    sd = golden_sd()
    sd["extra.weight"] = torch.zeros(1)
    del sd["conv_fuse.bias"]
    p = tmp_path / "k.safetensors"
    save_file(sd, str(p))
    with pytest.raises(ParagonError, match=r"missing keys: conv_fuse.bias.*unexpected keys: extra.weight"):
        load_model(p, scale=2)


def test_variant_scale_and_nan_checks(tmp_path):
    p = tmp_path / "g.safetensors"
    save_file(golden_sd(), str(p))
    with pytest.raises(ParagonError, match="holds paragonsr2_nano weights, not paragonsr2_s"):
        load_model(p, variant="paragonsr2_s", scale=2)
    with pytest.raises(ParagonError, match="pass --scale"):
        load_model(p)
    ours = save_model(make_model(scale=2), tmp_path / "o.safetensors", variant="paragonsr2_nano").path
    with pytest.raises(ParagonError, match="contradictory scale"):
        load_model(ours, scale=4)
    sd = golden_sd()
    sd["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(p))
    with pytest.raises(ParagonError, match="NaN/Inf weights in conv_out.weight"):
        load_model(p, scale=2)


def test_folder_and_non_integer_scale_metadata_are_named(tmp_path):
    # Issue 18: a folder given as checkpoint was reported as "does not exist"; metadata scale="two"
    # was a ValueError traceback.
    from click.testing import CliRunner

    from paragon_export.cli import main

    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(ParagonError, match="is a folder, not a file"):
        load_model(folder)
    m = make_model(scale=2)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "two.safetensors"),
              metadata={"scale": "two", "variant": "paragonsr2_nano"})
    with pytest.raises(ParagonError, match="metadata scale='two' is not a whole number"):
        load_model(tmp_path / "two.safetensors")
    for args, message in ((["fuse", folder, "-o", tmp_path / "f.safetensors"], "is a folder, not a file"),
                          (["bench", folder], "is a folder, not a file"),
                          (["onnx", tmp_path / "two.safetensors", "-o", tmp_path / "o"], "is not a whole number")):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
