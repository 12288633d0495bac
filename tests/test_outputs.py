"""Issue 18: nothing lost, nothing overwritten. --force replaces only what the toolkit wrote, never an
input; killed runs' temps are cleaned by the next run; failed commands leave no empty folders."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from paragon_export.artifact import atomic_output, sha256_file
from paragon_export.cli import main
from paragon_export.errors import ParagonError
from conftest import write_model


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_failure(r, *needles):
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, r.output


def photo(path, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_force_replaces_only_what_the_toolkit_wrote(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("the user's own file")
    with pytest.raises(ParagonError, match="not written by paragon-export"):
        with atomic_output(out, force=True) as t:
            t.write_text("ours")
    assert out.read_text() == "the user's own file"

    mine = tmp_path / "mine.json"
    with atomic_output(mine) as t:
        t.write_text("ours 1")
    with atomic_output(mine, force=True) as t:  # ours, unchanged: may be replaced
        t.write_text("ours 2")
    assert mine.read_text() == "ours 2"
    mine.write_text("edited by the user")  # changed since we wrote it: theirs now
    with pytest.raises(ParagonError, match="not written by paragon-export"):
        with atomic_output(mine, force=True) as t:
            t.write_text("ours 3")
    assert mine.read_text() == "edited by the user"
    assert oct(os.stat(tmp_path / "mine.json").st_mode & 0o777) != "0o600"


def test_fuse_onto_its_own_input_is_refused(tmp_path):
    ckpt = write_model(tmp_path / "nano.safetensors")
    before = sha256_file(ckpt)
    r = cli("fuse", ckpt, "-o", ckpt, "--force")
    one_line_failure(r, "is the input")
    assert sha256_file(ckpt) == before
    r = cli("fuse", ckpt, "-o", tmp_path, "--force")  # an existing folder: one line, folder untouched
    one_line_failure(r)
    assert ckpt.is_file() and sha256_file(ckpt) == before


def test_upscale_onto_its_inputs_is_refused(tmp_path):
    ckpt = write_model(tmp_path / "nano.safetensors")
    pics = tmp_path / "pics"
    pics.mkdir()
    a = photo(pics / "a.png")
    before = sha256_file(a)
    one_line_failure(cli("upscale", ckpt, pics, "-o", pics, "--force"), "is the input")
    # Another spelling of the same folder, caught where the files are planned.
    one_line_failure(cli("upscale", ckpt, a, "-o", tmp_path / "." / "pics", "--force"), "is the input")
    assert sha256_file(a) == before and sorted(p.name for p in pics.iterdir()) == ["a.png"]


def test_parity_force_never_deletes_a_foreign_folder(tmp_path, monkeypatch):
    ckpt = write_model(tmp_path / "nano.safetensors")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    one_line_failure(cli("parity", ckpt, "-o", notes, "--force", "--sizes", "24x24"), "not written by paragon-export")
    assert (notes / "todo.txt").read_text() == "mine"
    # A folder that holds an input is refused whatever it is.
    one_line_failure(cli("parity", ckpt, "-o", tmp_path, "--force"), "contains the input")
    monkeypatch.chdir(notes)
    one_line_failure(cli("parity", ckpt, "-o", ".", "--force", "--sizes", "24x24"))
    assert (notes / "todo.txt").read_text() == "mine"


def test_parity_force_replaces_its_own_report_folder(tmp_path):
    ckpt = write_model(tmp_path / "nano.safetensors")
    out = tmp_path / "par"
    assert cli("parity", ckpt, "-o", out, "--sizes", "24x24").exit_code == 0
    r = cli("parity", ckpt, "-o", out, "--sizes", "24x24", "--force")
    assert r.exit_code == 0, r.output
    (out / "my_notes.md").write_text("added by the user")
    one_line_failure(cli("parity", ckpt, "-o", out, "--sizes", "24x24", "--force"), "not written by paragon-export")
    assert (out / "my_notes.md").is_file()


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from paragon_export.artifact import atomic_folder, atomic_output
    folder = Path(sys.argv[1])
    with atomic_output(folder / "model.onnx") as t:
        t.write_bytes(b"half an onnx")
        with atomic_folder(folder / "parity") as d:
            (d / "crops").mkdir()
            (d / "crops" / "a.png").write_bytes(b"png")
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_temps_of_a_killed_run_are_cleaned_by_the_next_run(tmp_path):
    folder = tmp_path / "rel"
    folder.mkdir()
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(folder)])
    assert r.returncode == -signal.SIGKILL
    leftovers = [p.name for p in folder.iterdir()]
    assert len(leftovers) == 2 and all(n.startswith((".model.onnx.", ".parity.")) for n in leftovers), leftovers
    with atomic_output(folder / "other.json") as t:  # any later write into the folder
        t.write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == [".paragon-export.json", "other.json"]


def test_a_live_writers_temp_is_left_alone(tmp_path):
    live = tmp_path / f".x.onnx.paragon-{os.getppid()}.abc.tmp"  # our parent: alive
    live.write_text("being written")
    with atomic_output(tmp_path / "y.json") as t:
        t.write_text("{}")
    assert live.is_file()


@pytest.mark.parametrize("args", [
    ["int8", "{bad}.onnx", "-o", "{out}"],
    ["onnx", "{bad}.safetensors", "-o", "{out}"],
    ["ncnn", "{bad}.safetensors", "-o", "{out}"],
    ["qat", "{bad}.safetensors", "-o", "{out}", "--steps", "0"],
    ["parity", "{bad}.safetensors", "-o", "{out}"],
    ["release", "{bad}.safetensors", "-o", "{out}", "--no-engine"],
])
def test_failed_commands_leave_no_empty_output_folder(tmp_path, args):
    bad = tmp_path / "bad"
    for suffix in (".onnx", ".safetensors"):
        (tmp_path / f"bad{suffix}").write_bytes(b"\x00garbage")
    out = tmp_path / "new" / "out"
    r = cli(*[a.format(bad=bad, out=out) for a in args])
    one_line_failure(r)
    assert not out.parent.exists(), sorted(out.parent.rglob("*"))


def test_full_disk_and_out_of_memory_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    import errno

    from paragon_export import artifact
    from paragon_export.cli import fuse as fuse_cli

    ckpt = write_model(tmp_path / "nano.safetensors")
    out = tmp_path / "fused.safetensors"

    def full(_path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "_fsync", full)
    r = CliRunner().invoke(main, ["fuse", str(ckpt), "-o", str(out)])
    assert r.exit_code == 1 and "no space left on the device while writing" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nano.safetensors"]  # no output, no temp
    monkeypatch.undo()

    def oom(*_a, **_k):
        raise MemoryError

    monkeypatch.setattr(fuse_cli, "fuse", oom)
    r = CliRunner().invoke(main, ["fuse", str(ckpt), "-o", str(out)])
    assert r.exit_code == 1 and r.output.startswith("Error: out of memory") and len(r.output.strip().splitlines()) == 1
    assert not out.exists()
