"""release_steps: the steps `release` runs, one function each. A step returns its artifacts
([{"path", "kind", "parent", "meta"?}]) for the manifest; the int8-cpu, int8-openvino and ncnn steps
decide for themselves whether they run and call `run.step` (release._Run) themselves."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from .artifact import atomic_output
from .errors import ParagonError


def rel(root: Path, p: Path) -> str:
    return str(Path(p).resolve().relative_to(root.resolve()))


def fuse_step(src: Path, loaded, fused_path: Path, scale: int | None) -> list[dict]:
    if loaded.fused:
        with atomic_output(fused_path, force=True, inputs=[src]) as tmp:
            shutil.copyfile(src, tmp)
        return [{"path": fused_path, "kind": "fused", "parent": str(src), "meta": {"note": "source already fused"}}]
    from .fuse import fuse

    art, report = fuse(src, fused_path, scale=scale, force=True)
    return [{"path": art.path, "kind": "fused", "parent": str(src),
             "meta": {"exactness_max_abs": report.exactness_max_abs, "gap": report.gap.to_json(),
                      "params_before": report.params_before, "params_after": report.params_after}}]


def _fp32_summary(verification: dict) -> dict:
    """The manifest's line on the fp32 check: its worst max abs against its tolerance."""
    from .verify import ToleranceCheck

    v = ToleranceCheck.from_json(verification)
    return {"max_abs": v.max_abs, "atol": v.atol, "images": sum(g.images or 0 for g in v.groups.values())}


def onnx_step(root: Path, fused: Path, fp16: bool, opset: int) -> list[dict]:
    from .export_onnx import export_onnx
    from .export_recipe import ExportRecipe

    arts = export_onnx(fused, root, ExportRecipe(opset=opset, fp16=fp16), force=True)
    outs = [{"path": arts["fp32"].path, "kind": "onnx-fp32", "parent": rel(root, fused),
             "meta": {"verification": _fp32_summary(arts["fp32"].meta["verification"])}}]
    if "fp16" in arts:
        outs.append({"path": arts["fp16"].path, "kind": "onnx-fp16", "parent": rel(root, arts["fp32"].path)})
    return outs


def int8_step(root: Path, fp32: Path, calib: Path | None, progress: Callable[[str], None]) -> list[dict]:
    from .int8 import quantize_int8

    # The original recipe's comparison row is a diagnostic of `paragon-export int8`; a release
    # ships only the TensorRT recipe, and the comparison costs a second calibration.
    report = quantize_int8(fp32, root, calib_dir=calib, peer=False, force=True, progress=progress)
    q, mp = report.quality, report.mixed_precision
    return [{"path": report.path, "kind": "onnx-int8", "parent": rel(root, fp32),
             "meta": {"fp32": q.fp32.mean.to_json(), "int8": q.int8.mean.to_json(), "kept_float": mp.kept_float,
                      "mac_share": mp.mac_share}},
            {"path": report.report_path, "kind": "int8-report", "parent": rel(root, report.path)}]


def qat_step(root: Path, fused: Path, calib: Path | None, progress: Callable[[str], None]) -> list[dict]:
    from .qat import qat

    art, _ = qat(fused, root / "qat", data_dir=calib, force=True, progress=progress, bar=False)
    return [{"path": art.path, "kind": "onnx-qat", "parent": rel(root, fused)}]


def parity_step(root: Path, artifacts: list[Path], cpu_files: list[Path], ncnn_pairs: list[Path], src: Path,
                scale: int) -> list[dict]:
    from .parity import parity

    # The CPU int8 file's row is reported, never gating: whether it exists depends on this CPU.
    report = parity(artifacts + cpu_files + ncnn_pairs, root / "parity", ref=src, scale=scale, force=True,
                    ungated=tuple(cpu_files))
    return [{"path": root / "parity" / "parity.json", "kind": "parity-json", "parent": None,
             "meta": {"passed": report.passed, "runtimes": report.runtime_verdicts()}},
            {"path": root / "parity" / "parity.md", "kind": "parity-md", "parent": None},
            # every file of the folder, so a later run can prove it ours and remove it whole
            *({"path": root / "parity" / png, "kind": "parity-png", "parent": None}
              for png in report.outputs.pngs)]


def engine_step(root: Path, models: list[Path], progress: Callable[[str], None]) -> list[dict]:
    from paragon_export.engines.build import build_engine

    outs = []
    for p in models:
        art, _ = build_engine(p, root / "engines", check=True, force=True, progress=progress)
        outs.append({"path": art.path, "kind": "engine", "parent": rel(root, p)})
    return outs


def int8_cpu_step(run, total: int, root: Path, fp32: Path, calib, calib_digest, progress) -> list[Path]:
    """The ORT-CPU int8 file, beside the TensorRT one and only where it pays on this CPU: the step
    always records the figures and the decision; returns the file, if written, for parity."""
    from .cpu import isa

    def do_int8_cpu():
        from .int8_cpu import cpu_int8

        res = cpu_int8(fp32, root, calib_dir=calib, force=True, progress=lambda m: progress(f"    {m}"))
        progress(f"    {res.record.line()}")
        meta, parent = res.record.summary(), rel(root, fp32)
        outs = [{"path": Path(res.record.output.report), "kind": "int8-cpu-report", "parent": parent,
                 "meta": meta}]
        if res.artifact is not None:
            outs.insert(0, {"path": res.artifact.path, "kind": "onnx-int8-cpu", "parent": parent, "meta": meta})
        return outs

    # The decision is measured on this machine: another ISA makes a new one.
    rec = run.step("int8-cpu", total, {"fp32": fp32}, {"calib": calib_digest, "isa": isa()}, do_int8_cpu)
    return [run.root / a["path"] for a in rec["artifacts"] if a["kind"] == "onnx-int8-cpu"]


def int8_openvino_step(run, total: int, root: Path, trt_int8: Path, progress) -> list[Path]:
    """The INT8 file for OpenVINO beside the TensorRT one; its failure costs that file, not the release."""
    def do_int8_openvino():
        from .int8_openvino import write_openvino_int8

        ov = write_openvino_int8(trt_int8, root, force=True)
        return [{"path": ov.path, "kind": "onnx-int8-openvino", "parent": rel(root, trt_int8),
                 "meta": {"openvino_vs_reference": ov.check.to_json()}}]

    try:
        rec = run.step("int8-openvino", total, {"int8": trt_int8}, {}, do_int8_openvino)
    except ParagonError as e:  # an extra for one runtime: its failure costs that file, not the release
        progress(f"int8-openvino: not written ({e}); the card lists where the TensorRT int8 file is verified")
        return []
    return [run.path(rec, "onnx-int8-openvino")]


def ncnn_step(run, total: int, root: Path, fused: Path, fp32: Path, precisions, reason: str | None,
              progress) -> list[Path]:
    """NCNN pairs (fp32, and fp16 storage with fp16) from the release's own fp32 ONNX, verified against
    the fused checkpoint; skipped with a note when pnnx/ncnn are missing. Returns the .param paths."""
    if reason:
        progress(f"ncnn: skipped ({reason})")
        return []
    wanted = ("fp32", "fp16") if "fp16" in precisions else ("fp32",)

    def do_ncnn():
        from .ncnn_export import export_ncnn

        arts = export_ncnn(fused, root / "ncnn", onnx=fp32, precisions=wanted, force=True)
        outs = []
        for p, art in arts.items():
            v = art.meta["verification"]
            outs += [{"path": art.path, "kind": f"ncnn-{p}", "parent": rel(root, fp32),
                      "meta": {"max_abs": v["max_abs"], "min_psnr": v["min_psnr"], "pnnx": art.meta["converter"]["pnnx"]}},
                     {"path": art.path.with_suffix(".bin"), "kind": f"ncnn-{p}-bin", "parent": rel(root, art.path)},
                     {"path": art.path.with_suffix(".json"), "kind": f"ncnn-{p}-json", "parent": rel(root, art.path)}]
        return outs

    rec = run.step("ncnn", total, {"fused": fused, "fp32": fp32}, {"precisions": list(wanted)}, do_ncnn)
    return [root / a["path"] for a in rec["artifacts"] if a["kind"] in ("ncnn-fp32", "ncnn-fp16")]
