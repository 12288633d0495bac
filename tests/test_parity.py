"""paragon-export parity: real ORT / torch runs of a seeded nano on the bundled photos."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from PIL import Image

from conftest import make_model
from paragon_export.checkpoint import save_model
from paragon_export.cli import main
from paragon_export.errors import ParagonError
from paragon_export.images import lr_hr_crops, sample_photo_paths, to_tensor
from paragon_export.localize import localize, scope_to_module
from paragon_export.parity import onnx_precision, parity
from paragon_export.parity_files import LABEL_H, PAD
from paragon_export.parity_report import ParityReport
from paragon_export.runners import tensorrt_unavailable

SIZES = "32x32,27x45"  # LR; the second is not a multiple of 8
CORRUPT_INIT = "body.1.blocks.0.transformer.project_in.weight"
CORRUPT_MODULE = "body.1.blocks.0.transformer.project_in"
NAN_INIT = "body.0.blocks.1.context.dwconv_w.weight"
SCHEMA = Path(__file__).resolve().parents[1] / "paragon_export" / "schemas" / "parity.schema.json"


def _export(model, path: Path) -> Path:
    torch.onnx.export(model, (torch.rand(1, 3, 24, 24),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {2: "h", 3: "w"}, "output": {2: "H", 3: "W"}})
    return path


def _edit_initializer(src: Path, dst: Path, name: str, edit) -> Path:
    model = onnx.load(str(src))
    init = next(i for i in model.graph.initializer if i.name == name)
    a = numpy_helper.to_array(init).copy()
    edit(a)
    init.CopyFrom(numpy_helper.from_array(a, name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("parity_artifacts")
    torch.manual_seed(0)  # build() initialises the convs from the global RNG
    model = make_model()
    ref = d / "nano_x2.safetensors"
    save_model(model, ref, variant="paragonsr2_nano", force=True)
    fp32 = _export(model.fuse_for_release().eval(), d / "nano_fp32.onnx")

    from onnxconverter_common import float16

    m16 = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(m16, str(d / "nano_fp16.onnx"))

    def bump(a):
        a.flat[5] += 0.5  # one weight of one 1x1 conv

    corrupt = _edit_initializer(fp32, d / "nano_corrupt.onnx", CORRUPT_INIT, bump)
    nan = _edit_initializer(fp32, d / "nano_nan.onnx", NAN_INIT, lambda a: a.__setitem__((0, 0, 0, 3), np.nan))
    return {"dir": d, "ref": ref, "fp32": fp32, "fp16": d / "nano_fp16.onnx", "corrupt": corrupt, "nan": nan}


def _by_name(report: dict) -> dict:
    return {a["name"]: a for a in report["artifacts"]}


def test_passing_set_exits_0_with_valid_json_and_pngs(arts, tmp_path):
    extra = []
    if tensorrt_unavailable():  # a stand-in engine is skipped (not failed) without TensorRT/GPU
        (tmp_path / "nano_fp16.engine").write_bytes(b"not an engine")
        extra = [str(tmp_path / "nano_fp16.engine")]
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["parity", str(arts["ref"]), str(arts["fp32"]), str(arts["fp16"]), *extra,
                                    "--sizes", SIZES, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "# Parity: PASS" in res.output
    report = json.loads((out / "parity.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    assert report["passed"] is True and report["schema_version"] == 1
    assert report["tool_versions"]["polygraphy"] and report["tool_versions"]["onnxruntime"]
    a = _by_name(report)
    for key in ("fp32", "fp16"):
        entry = a[arts[key].name]
        assert entry["status"] == "pass"
        assert entry["sha256"] == hashlib.sha256(arts[key].read_bytes()).hexdigest()
        assert entry["polygraphy"]["passed"] and entry["polygraphy"]["iterations"] == 8
        assert len(entry["results"]) == 8  # 4 photos x 2 sizes
    assert a["nano_fp16.onnx"]["precision"] == "fp16" and a["nano_fp32.onnx"]["precision"] == "fp32"
    assert a["nano_fp32.onnx"]["summary"]["max_abs"] < 1e-5  # ORT vs torch fp32: float reordering only
    assert a["torch fp16"]["status"] == "pass" and a["torch fp16"]["summary"]["max_abs"] > 1e-5
    assert a["torch dynamic (unfused)"]["status"] == "info"
    if extra:
        assert a["nano_fp16.engine"]["status"] == "skipped"
        assert "TensorRT" in a["nano_fp16.engine"]["reasons"][0] or "GPU" in a["nano_fp16.engine"]["reasons"][0]
    # PNGs: 2 rows of HR panels; columns = bicubic, reference, then every artifact that produced images
    shown = sum(1 for e in report["artifacts"] if e["role"] != "reference" and e["results"])
    cols = 2 + shown
    assert len(report["outputs"]["pngs"]) == 3
    for rel in report["outputs"]["pngs"]:
        h, w = (int(v) for v in Path(rel).stem.rsplit("_", 1)[1].split("x"))
        with Image.open(out / rel) as im:
            assert im.size == (cols * 2 * w + (cols + 1) * PAD, 2 * (LABEL_H + 2 * h) + 3 * PAD)
    md = (out / "parity.md").read_text()
    assert "| PASS | nano_fp32.onnx |" in md and "| PASS | nano_fp16.onnx |" in md
    # the typed report is what the files hold: nothing lost reading parity.json back, and it renders parity.md
    typed = ParityReport.from_json(report)
    assert typed.to_json() == report and typed.markdown() == md
    assert typed.artifacts[0].role == "reference" and typed.thresholds["fp16"].min_psnr == 50.0
    # the folder is not overwritten without --force
    res = CliRunner().invoke(main, ["parity", str(arts["ref"]), str(arts["fp32"]), "--sizes", SIZES, "-o", str(out)])
    assert res.exit_code == 1 and "already exists" in res.output


def test_corrupted_weight_fails_named_and_localized(arts, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["parity", str(arts["corrupt"]), str(arts["fp32"]), "--ref", str(arts["ref"]),
                                    "--sizes", SIZES, "--localize", "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "# Parity: FAIL" in res.output and "| **FAIL** | nano_corrupt.onnx |" in res.output
    assert "| PASS | nano_fp32.onnx |" in res.output
    report = json.loads((out / "parity.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    bad = _by_name(report)["nano_corrupt.onnx"]
    assert bad["status"] == "fail" and any("max abs" in r for r in bad["reasons"])
    assert bad["polygraphy"]["passed"] is False
    loc = bad["localization"]
    assert loc["method"] == "onnx-reference" and loc["reference"].endswith("nano_fp32.onnx")
    assert loc["sharp_jump"] and loc["culprit"]["module"] == CORRUPT_MODULE
    assert CORRUPT_INIT in loc["culprit"]["weights"]
    assert CORRUPT_MODULE in (out / "parity.md").read_text()
    # the same artifact passes once the limits are loosened past its error
    worst = bad["summary"]
    res = CliRunner().invoke(main, ["parity", str(arts["corrupt"]), "--ref", str(arts["ref"]), "--sizes", "27x45",
                                    "--atol", str(worst["max_abs"] * 2), "--min-psnr", str(worst["min_psnr"] - 1),
                                    "-o", str(tmp_path / "loose")])
    assert res.exit_code == 0, res.output


def test_localizer_via_torch_hooks_names_the_layer(arts):
    """Without a same-topology fp32 ONNX, the layers are matched to torch modules by node name."""
    torch.manual_seed(0)
    fused = make_model().fuse_for_release().eval()
    _, lr, _ = lr_hr_crops(sample_photo_paths("eval")[:1], 2, (27, 45))[0]
    feed = {"input": to_tensor(lr).numpy()}
    loc = localize(arts["corrupt"], "fp32", feed, torch_model=fused, ref_onnx=[])
    assert loc.method == "torch-hooks" and loc.layers_compared >= 25
    assert loc.culprit.module == CORRUPT_MODULE and loc.sharp_jump
    # every mapped layer before the corrupted one agrees with torch to float precision
    before = loc.culprit.prev_max_rel_err
    assert before < 1e-5 and loc.culprit.rel_err > 1e-2
    # an intact export has no jump above the fp32 floor
    clean = localize(arts["fp32"], "fp32", feed, torch_model=fused, ref_onnx=[])
    assert not clean.sharp_jump and max(r.rel_err for r in clean.top) < 1e-4


def test_nan_weight_is_detected_and_localized(arts, tmp_path):
    report = parity([arts["nan"]], tmp_path / "r", ref=arts["ref"], sizes="27x45", localize=True, png_crops=1)
    assert report.passed is False
    bad = next(a for a in report.artifacts if a.name == "nano_nan.onnx")
    assert bad.status == "fail" and bad.summary.nonfinite > 0
    assert any("NaN/Inf" in r for r in bad.reasons)
    assert bad.localization.culprit.weights[0] == NAN_INIT
    assert bad.localization.culprit.rel_err is None  # non-finite
    assert json.loads((tmp_path / "r" / "parity.json").read_text()) == report.to_json()


def test_precision_from_metadata_and_graph(arts):
    m = onnx.load(str(arts["fp32"]))
    assert onnx_precision(m) == ("fp32", "graph (fp32 initializers)")
    onnx.helper.set_model_props(m, {"precision": "float32"})
    assert onnx_precision(m) == ("fp32", "metadata precision=float32")
    onnx.helper.set_model_props(m, {"precision": "int8-qdq"})  # a label the graph contradicts
    assert onnx_precision(m) == ("fp32", "graph (fp32 initializers); metadata says precision=int8-qdq")
    assert onnx_precision(onnx.load(str(arts["fp16"])))[0] == "fp16"


def test_scope_to_module():
    assert scope_to_module("/body/body.0/blocks/blocks.1/transformer/project_in/Conv") == \
        "body.0.blocks.1.transformer.project_in"
    assert scope_to_module("/conv_in/Conv") == "conv_in"
    assert scope_to_module("Conv_12") is None


def test_bad_inputs_are_one_line_errors(arts, tmp_path):
    with pytest.raises(ParagonError, match="no reference"):
        parity([arts["fp32"]], tmp_path / "a")
    with pytest.raises(ParagonError, match="unknown artifact type"):
        parity([arts["ref"], tmp_path / "model.tflite"], tmp_path / "b")
    with pytest.raises(ParagonError, match="does not exist"):
        parity([arts["ref"], tmp_path / "missing.onnx"], tmp_path / "c")
    res = CliRunner().invoke(main, ["parity", str(arts["fp32"]), "--ref", str(arts["fp32"]), "-o", str(tmp_path / "d")])
    assert res.exit_code == 1 and res.output.startswith("Error: --ref must be") and "Traceback" not in res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_unreadable_user_images_are_skipped_and_listed(arts, tmp_path):
    # Issue 18: parity --images stopped at the first unreadable file; now all are decoded first.
    import shutil

    from paragon_export.images import sample_photo_paths

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sample_photo_paths("eval")[:2]:
        shutil.copy(p, imgs)
    (imgs / "0_cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    report = parity([arts["ref"]], tmp_path / "out", images=imgs, sizes=[(24, 24)])
    assert report.passed and len(report.images) == 2
    assert any("0_cut.png: unreadable" in n for n in report.notes), report.notes
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(imgs / "0_cut.png", bad)
    with pytest.raises(ParagonError, match="no readable image in .*0_cut.png"):
        parity([arts["ref"]], tmp_path / "out2", images=bad, sizes=[(24, 24)])
