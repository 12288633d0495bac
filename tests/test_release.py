import json

import pytest

from paragon_export.errors import ParagonError
from paragon_export.release import release
from conftest import write_model


def run(ckpt, out, **kw):
    kw.setdefault("ncnn", False)  # the NCNN step has its own tests (test_ncnn.py)
    lines = []
    release(ckpt, out, progress=lines.append, **kw)
    return lines


def test_release_manifest_rerun_and_change(tmp_path):
    ckpt = write_model(tmp_path / "nano.safetensors", seed=3)
    out = tmp_path / "rel"
    first = run(ckpt, out, precisions=("fp32",), engine=False)
    assert any("fuse: done" in ln for ln in first) and any("parity: done" in ln for ln in first)
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["steps"]) == {"fuse", "onnx", "parity"}
    kinds = {a["kind"]: a for s in m["steps"].values() for a in s["artifacts"]}
    assert kinds["onnx-fp32"]["parent"] == "paragonsr2_nano_x2_fused.safetensors"
    v = kinds["onnx-fp32"]["meta"]["verification"]  # the fp32 check's figures, not null
    assert 0 <= v["max_abs"] <= v["atol"] == 1e-4 and v["images"] >= 8
    assert kinds["parity-json"]["meta"]["passed"] is True
    assert (out / "MODEL_CARD.md").read_text().count("PASS") >= 2

    again = run(ckpt, out, precisions=("fp32",), engine=False)
    assert sum("unchanged, skipped" in ln for ln in again) == 3

    # A tampered output re-runs only its own step (and what depends on it keeps its key if bytes match).
    (out / "paragonsr2_nano_x2_fp32_op17.onnx").write_bytes(b"broken")
    third = run(ckpt, out, precisions=("fp32",), engine=False)
    assert any("fuse: unchanged" in ln for ln in third) and any("onnx: done" in ln for ln in third)

    # New weights: every step re-runs.
    write_model(ckpt, seed=4)
    fourth = run(ckpt, out, precisions=("fp32",), engine=False)
    assert not any("unchanged" in ln for ln in fourth)


def test_failed_step_keeps_finished_steps_consistent(tmp_path):
    ckpt = write_model(tmp_path / "nano.safetensors", seed=5)
    out = tmp_path / "rel"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ParagonError, match="release stopped at step 'int8'.*no"):
        run(ckpt, out, precisions=("fp32", "int8"), calib=empty, engine=False)
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["steps"]) == {"fuse", "onnx"}
    for step in m["steps"].values():
        for a in step["artifacts"]:
            assert (out / a["path"]).is_file()


def test_release_refuses_foreign_folder_and_bad_precisions(tmp_path):
    ckpt = write_model(tmp_path / "nano.safetensors")
    with pytest.raises(ParagonError, match="fp32 plus"):
        run(ckpt, tmp_path / "a", precisions=("fp16",))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ParagonError, match="no release manifest"):
        run(ckpt, foreign, precisions=("fp32",), engine=False)


def test_release_of_a_scale_1_checkpoint_passes_parity_and_writes_a_card(tmp_path):
    # Issue 18 item 1: at x1 bicubic is the identity (LR = HR crop), so its PSNR is infinite.
    ckpt = write_model(tmp_path / "nano_x1.safetensors", scale=1, seed=2)
    out = tmp_path / "rel"
    run(ckpt, out, precisions=("fp32",), engine=False)
    report = json.loads((out / "parity" / "parity.json").read_text())
    assert report["passed"] and report["reference"]["scale"] == 1
    assert all(c["bicubic_y_psnr"] is None for c in report["cases"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "x1 release" in card and "Parity: PASS" in card and "bicubic is the identity" in card


def _listed(out):
    m = json.loads((out / "manifest.json").read_text())
    return m, {a["path"] for s in m["steps"].values() for a in s["artifacts"]}


def test_rerun_with_another_checkpoint_and_fewer_precisions_leaves_no_stale_artifact(tmp_path):
    # Issue 18 item 4: the folder, the manifest and the card describe the last run only.
    out = tmp_path / "rel"
    run(write_model(tmp_path / "a.safetensors", seed=1), out, precisions=("fp32", "fp16"), engine=False)
    assert (out / "paragonsr2_nano_x2_fp16_op17.onnx").is_file()
    run(write_model(tmp_path / "b.safetensors", scale=1, seed=2), out, precisions=("fp32",), engine=False)
    m, listed = _listed(out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert files == listed | {"manifest.json", "MODEL_CARD.md"}
    assert not any("x2" in f for f in files) and m["source"]["scale"] == 1
    card = (out / "MODEL_CARD.md").read_text()
    assert "x2" not in card.split("## Parity")[0] and "fp16" not in card.split("## Parity")[0]


def test_release_leftovers_and_stale_temps_do_not_block_a_rerun(tmp_path):
    # A full disk during the first manifest write left only a temp: the rerun is not refused, and cleans it.
    out = tmp_path / "rel"
    out.mkdir()
    (out / ".manifest.json.paragon-999999999.x1y2.tmp").write_text("{")
    with pytest.raises(ParagonError, match="TensorRT"):  # --engine without TensorRT: before any step
        run(write_model(tmp_path / "a.safetensors"), out, precisions=("fp32",), engine=True)
    assert not (out / "paragonsr2_nano_x2_fused.safetensors").exists()
    assert not (out / ".manifest.json.paragon-999999999.x1y2.tmp").exists()


def test_second_concurrent_release_refuses_with_the_holders_pid(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "rel"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from paragon_export.release import _folder_lock\n"
        "with _folder_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"), str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        with pytest.raises(ParagonError, match=f"another release is running in .*PID {holder.pid}"):
            run(write_model(tmp_path / "a.safetensors"), out, precisions=("fp32",), engine=False)
        assert time.time() - t0 < 30
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "paragonsr2_nano_x2_fused.safetensors").exists()


def test_int8_cpu_step_records_the_decision_and_its_parity_row_never_gates(tmp_path, monkeypatch):
    """The step's wiring: manifest kinds and figures, the file only for parity (ungated). The speed
    test is made to pass whatever this CPU measures: nothing here depends on a timing."""
    import functools
    import math

    import paragon_export.int8_cpu as int8_cpu
    from paragon_export.cpu import isa
    from paragon_export.export_onnx import export_onnx
    from paragon_export.export_recipe import ExportRecipe
    from paragon_export.int8_recipe import Int8Recipe
    from paragon_export.parity import parity
    from paragon_export.release import _Run
    from paragon_export.release_steps import int8_cpu_step

    ckpt = write_model(tmp_path / "nano.safetensors", fused=True, seed=6)
    out = tmp_path / "rel"
    fp32 = export_onnx(ckpt, out, ExportRecipe(opset=17))["fp32"].path
    small = Int8Recipe(lr_size=(24, 24), crops_per_image=1, eval_size=(32, 32))
    monkeypatch.setattr(int8_cpu, "cpu_int8", functools.partial(
        int8_cpu.cpu_int8, recipe=small, min_speedup=0.0, min_psnr=-math.inf, probe_lr=(32, 32), budget_s=0.0,
        cache_dir=tmp_path / "cache"))
    lines = []
    files = int8_cpu_step(_Run(out, lines.append), 1, out, fp32, None, "digest", lines.append)
    assert [f.name for f in files] == [f"paragonsr2_nano_x2_int8_cpu_{isa().replace('-', '')}_op17.onnx"]
    m = json.loads((out / "manifest.json").read_text())
    arts = {a["kind"]: a for a in m["steps"]["int8-cpu"]["artifacts"]}
    assert set(arts) == {"onnx-int8-cpu", "int8-cpu-report"} and m["steps"]["int8-cpu"]["params"]["isa"] == isa()
    meta = arts["onnx-int8-cpu"]["meta"]
    assert meta["shipped"] and meta["isa"] == isa() and meta["speedup"] > 0 and "CPU int8" in meta["line"]
    assert any("CPU int8" in ln for ln in lines)

    report = parity([fp32, *files], tmp_path / "par", ref=ckpt, ungated=tuple(files))
    rows = {a.name: a for a in report.artifacts}
    cpu_rows = [a for n, a in rows.items() if n.startswith(files[0].name)]
    # the file (Q/DQ reference semantics), its native-kernel row and other runtimes' rows
    assert len(cpu_rows) >= 2 and not any(a.gated for a in cpu_rows)
    assert rows[fp32.name].gated and report.passed


def test_manifest_has_the_same_permissions_as_every_artifact(tmp_path):
    # Issue 18 item 8: manifest.json was written 0600 (mkstemp's mode), every other artifact 0644.
    import os

    out = tmp_path / "rel"
    before = os.umask(0o022)
    try:
        run(write_model(tmp_path / "a.safetensors"), out, precisions=("fp32",), engine=False)
    finally:
        os.umask(before)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    onnx_file = out / "paragonsr2_nano_x2_fp32_op17.onnx"
    assert mode(out / "manifest.json") == mode(onnx_file) == mode(out / "MODEL_CARD.md")
    assert mode(out / "manifest.json") == 0o644


def test_release_of_a_traiNNer_redux_scale_1_checkpoint(tmp_path):
    # Issue 18 acceptance: a traiNNer-redux x1 file (legacy upsampler, params_ema wrapper, no metadata).
    from safetensors.torch import save_file

    from conftest import make_model

    sd = make_model(scale=1, upsampler="legacy", seed=6).state_dict()
    ckpt = tmp_path / "trainner_x1.safetensors"
    save_file({f"params_ema.{k}": v.contiguous() for k, v in sd.items()}, str(ckpt))
    out = tmp_path / "rel"
    run(ckpt, out, precisions=("fp32",), engine=False, scale=1)
    report = json.loads((out / "parity" / "parity.json").read_text())
    assert report["passed"] and report["reference"]["scale"] == 1
    assert "Parity: PASS" in (out / "MODEL_CARD.md").read_text()
