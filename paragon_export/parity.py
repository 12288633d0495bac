"""parity: every artifact vs the fp32 PyTorch reference on the same real images, through Polygraphy.

Each runner (torch CPU, ONNX Runtime CPU, TensorRT) goes through `Comparator.run` on the same LR
crops; `Comparator.compare_accuracy` with a max-abs `SimpleCompareFunc` checks each artifact
against the reference, and the report's PSNR / Y-PSNR / SSIM come from paragon_export.metrics
(Polygraphy's PsnrCompareFunc scales by the reference's maximum, not by the [0, 1] image range).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
from polygraphy.exception import PolygraphyException
from polygraphy.logger import G_LOGGER

from paragon_export.calibration.sources import readable_folder

from .artifact import check_output
from .errors import ParagonError
from .images import bicubic_upscale, lr_hr_crops, parse_sizes, sample_photo_paths, to_image, to_tensor
from .localize import localize as localize_onnx
from .manifest import tool_versions
from .memory import refuse_what_cannot_fit
from .metrics import psnr_y, ssim_y
from .parity_files import write_outputs
from .parity_report import CaseInfo, CaseResult, Localization, ParityReport, PolygraphyCheck, ReferenceQuality, Reference, Summary
from .parity_rows import (RUNNER_LABELS, Entry, artifact_entry, classify, first_line, native_int8_entry,
                          reference_entries, runtime_entries)
from .runners import INPUT_NAME, onnx_precision, open_runner
from .verify import LIMITS, VERIFY_SIZES, Limits, compare

__all__ = ["parity", "classify", "onnx_precision", "DEFAULT_SIZES"]

DEFAULT_SIZES = ",".join(f"{h}x{w}" for h, w in VERIFY_SIZES)


def _case_metrics(case: tuple, out: np.ndarray, ref: np.ndarray, scale: int) -> CaseResult:
    name, size, _, hr = case
    c = compare(np.asarray(out, np.float32), ref)
    m = CaseResult(name, list(size), nonfinite=c.nonfinite)
    if c.shape_mismatch:
        m.error = f"output shape {c.shape_mismatch.replace(' vs ', ' != reference ')}"
        return m
    if c.nonfinite:
        return m
    img = np.clip(to_image(out), 0.0, 1.0)
    m.max_abs, m.mean_abs, m.psnr = c.max_abs, c.mean_abs, None if np.isinf(c.psnr) else c.psnr
    m.y_psnr, m.ssim = psnr_y(img, hr, scale), ssim_y(img, hr, scale)
    return m


def _summarise(rs: list[CaseResult], ref_y: float) -> Summary:
    def vals(k: str) -> list[float]:
        return [getattr(r, k) for r in rs if getattr(r, k) is not None]

    mean = lambda k: float(np.mean(vals(k))) if vals(k) else None  # noqa: E731
    psnrs = vals("psnr")
    y = mean("y_psnr")
    return Summary(cases=len(rs), max_abs=max(vals("max_abs"), default=None), mean_abs=mean("mean_abs"),
                   # None = bit-identical to the reference on every case (infinite PSNR)
                   min_psnr=min(psnrs, default=None), mean_psnr=mean("psnr"), y_psnr=y,
                   y_psnr_delta=None if y is None else y - ref_y, ssim=mean("ssim"),
                   nonfinite=sum(r.nonfinite for r in rs),
                   identical_cases=sum(1 for r in rs if r.psnr is None and r.max_abs is not None))


def _verdict(entry: Entry) -> None:
    if not entry.gated and not entry.compat:
        entry.status = "info"
        return
    lim = entry.limits
    s = entry.summary
    reasons = sorted({r.error for r in entry.results if r.error})
    if s.nonfinite:
        bad = sum(1 for r in entry.results if r.nonfinite)
        reasons.append(f"{s.nonfinite} NaN/Inf output values in {bad} of {s.cases} cases")
    if s.max_abs is not None and s.max_abs > lim.max_abs:
        reasons.append(f"max abs {s.max_abs:.3g} > {lim.max_abs:g}")
    if s.min_psnr is not None and s.min_psnr < lim.min_psnr:
        reasons.append(f"PSNR {s.min_psnr:.2f} dB < {lim.min_psnr:g} dB")
    if entry.polygraphy and not entry.polygraphy.passed and not reasons:
        reasons.append("Polygraphy's max-abs comparison failed")
    if reasons and entry.context:
        reasons.append(entry.context)
    entry.reasons = reasons
    entry.status = "fail" if reasons else "pass"


@contextlib.contextmanager
def _quiet_polygraphy():
    """Polygraphy logs every comparison; the report says it once. Its critical errors still raise
    (PolygraphyException), and their message goes into the report instead of the terminal."""
    severity, colors = G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.module_severity, G_LOGGER.colors = G_LOGGER.CRITICAL + 1, False
    try:
        yield
    finally:
        G_LOGGER.module_severity, G_LOGGER.colors = severity, colors


def _run(entry: Entry, feeds: list) -> RunResults | None:
    try:
        return Comparator.run([entry.make_runner()], data_loader=feeds)
    except (PolygraphyException, ParagonError, RuntimeError, ValueError, OSError) as e:
        entry.error = f"{entry.runner} could not run it: {first_line(e)}"
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
        entry.error = f"{entry.runner} could not run it: {type(e).__name__}: {first_line(e)}"
    return None


def parity(artifacts: list[Path | str], out_dir: Path | str, *, ref: Path | str | None = None,
           images: Path | str | None = None, sizes: str | list[tuple[int, int]] = DEFAULT_SIZES,
           atol: float | None = None, min_psnr: float | None = None, localize: bool = False,
           force: bool = False, png_crops: int = 3, scale: int | None = None,
           runtimes: tuple[str, ...] | None = None, require: tuple[str, ...] = (),
           ungated: tuple[Path | str, ...] = ()) -> ParityReport:
    """Compare every artifact with the fp32 torch reference; write parity.json/.md and PNGs to out_dir.

    Returns the report as written (`ParityReport`; parity.json is its `to_json()`); `.passed` is the gate.
    `scale` is only needed for a reference checkpoint that does not record it (traiNNer-redux).
    Every ONNX artifact also gets a row per other runtime that can run it (OpenVINO), or only for
    those in `runtimes`; such a row gates only when its runtime is in `require` (skipped if missing).
    Artifacts in `ungated` get reported rows that do not decide the result."""
    paths = [Path(a) for a in artifacts]
    inputs = [*paths, ref, images]  # the report folder replaces DIR as a whole: never over an input
    out_dir = check_output(Path(os.path.abspath(out_dir)), force=force, inputs=inputs)
    ref = _reference_path(paths, ref)
    paths = [p for p in paths if not (p.exists() and ref.exists() and p.resolve() == ref.resolve())]
    size_list = parse_sizes(sizes) if isinstance(sizes, str) else [tuple(s) for s in sizes]
    thresholds = {k: Limits(atol if atol is not None else v.max_abs, min_psnr if min_psnr is not None else v.min_psnr)
                  for k, v in LIMITS.items()}

    refuse_what_cannot_fit([ref, *paths], size_list, "parity")
    taken: set = set()
    loaded, fused, entries = reference_entries(ref, taken, scale)
    scale = loaded.scale
    _check_sizes(size_list, scale)
    entries += _artifact_entries(paths, scale, taken, runtimes, require, ungated)
    for e in entries:
        if e.gated and e.skip and e.role == "runtime" and e.runner in {RUNNER_LABELS[r] for r in require}:
            e.error, e.skip = f"required runtime: {e.skip}", None
        e.limits = thresholds[e.precision] if (e.gated or e.compat) else None

    # The user's images are all decoded first: unreadable ones are listed in the notes, not a stop midway.
    image_paths, skipped_images = readable_folder(images) if images else (sample_photo_paths("eval"), [])
    cases = [(name, size, lr, hr) for size in size_list for name, lr, hr in lr_hr_crops(image_paths, scale, size)]
    feeds = [OrderedDict([(INPUT_NAME, to_tensor(lr).numpy())]) for _, _, lr, _ in cases]
    with _quiet_polygraphy():
        _run_all(entries, feeds)
    case_info = _case_info(cases, entries[0], scale)
    ref_y = float(np.mean([c.reference_y_psnr for c in case_info]))
    _judge(entries, cases, ref_y, scale)
    for e in entries:
        if e.runner == RUNNER_LABELS["openvino"] and e.precision == "int8" and e.status == "fail":
            _diagnose_openvino_int8(e, feeds[_worst_case(e)], thresholds["int8"].min_psnr)
    if localize:
        _localize(entries, feeds, cases, fused)
    report = _report(entries, loaded, ref, image_paths, images, size_list, thresholds, atol, min_psnr,
                     case_info, ref_y)
    report.notes += [f"image skipped: {s}" for s in skipped_images]
    return write_outputs(report, entries, cases, scale, out_dir, force=force, png_crops=png_crops, inputs=inputs)


def _reference_path(paths: list[Path], ref: Path | str | None) -> Path:
    """--ref, or the first checkpoint among the artifacts; every path must have a known suffix."""
    if not paths:
        raise ParagonError("no artifacts given")
    for p in paths:
        classify(p)
    if ref is None:
        ckpts = [p for p in paths if classify(p) == "checkpoint"]
        if not ckpts:
            raise ParagonError("no reference: pass --ref CHECKPOINT or list a .safetensors/.pth among the artifacts")
        ref = ckpts[0]
    ref = Path(ref)
    if classify(ref) != "checkpoint":
        raise ParagonError(f"--ref must be a .safetensors or .pth checkpoint, not {ref.name}")
    return ref


def _check_sizes(size_list: list[tuple[int, int]], scale: int) -> None:
    smallest = 2 + -(-7 // scale)  # SSIM's 7x7 window must fit after the metrics' border of `scale` px
    if any(min(sz) < smallest for sz in size_list):
        raise ParagonError(f"--sizes: every LR side must be >= {smallest} px at x{scale} (SSIM needs a 7x7 window "
                           f"inside the {scale}-px border), got {','.join(f'{h}x{w}' for h, w in size_list)}")


def _artifact_entries(paths: list[Path], scale: int, taken: set, runtimes, require, ungated) -> list[Entry]:
    """Each artifact's row (not gating for those in `ungated`), its native-int8 row and its other-runtime rows."""
    entries: list[Entry] = []
    free = {os.path.abspath(u) for u in ungated}
    for p in paths:
        art = artifact_entry(p, scale, taken, gated=os.path.abspath(p) not in free)
        entries.append(art)
        if art.kind == "onnx" and art.precision == "int8" and not art.error:
            entries.append(native_int8_entry(art, taken))
        entries += runtime_entries(art, scale, taken, runtimes, set(require))
    return entries


def _run_all(entries: list[Entry], feeds: list) -> None:
    """Every row through `Comparator.run` on the same feeds, then Polygraphy's max-abs check of each
    judged row against the reference (the first row)."""
    results = RunResults()
    for e in entries:
        if e.skip or e.error:
            continue
        rr = _run(e, feeds)
        if rr is None:
            if e.role == "reference":
                raise ParagonError(f"the reference failed to run: {e.error}")
            continue
        for name, iters in rr.items():
            results.append((name, iters))
            e.outputs = [np.asarray(next(iter(it.values())), np.float32) for it in iters]
    names = list(results.keys())
    for e in entries:
        if e.role == "reference" or not e.outputs or not (e.gated or e.compat):
            continue
        func = SimpleCompareFunc(check_error_stat="max", atol=e.limits.max_abs, rtol=0.0)
        acc = Comparator.compare_accuracy(results, comparisons=[(0, names.index(e.name))], compare_func=func)
        matched, _, total = acc[0].stats((names[0], e.name))
        e.polygraphy = PolygraphyCheck(f"SimpleCompareFunc(check_error_stat=max, atol={e.limits.max_abs:g})",
                                       bool(acc), int(matched), int(total))


def _case_info(cases: list, reference: Entry, scale: int) -> list[CaseInfo]:
    """Per case: bicubic's and the reference's Y-PSNR/SSIM against the HR crop."""
    out = []
    for k, (name, size, lr, hr) in enumerate(cases):
        bic = bicubic_upscale(lr, scale)
        ref_img = np.clip(to_image(reference.outputs[k]), 0.0, 1.0)
        out.append(CaseInfo(name, list(size), psnr_y(bic, hr, scale), ssim_y(bic, hr, scale),
                            psnr_y(ref_img, hr, scale), ssim_y(ref_img, hr, scale)))
    return out


def _judge(entries: list[Entry], cases: list, ref_y: float, scale: int) -> None:
    """Per-case metrics, summary and verdict of every row."""
    reference = entries[0]
    for e in entries:
        if e.skip:
            e.status, e.reasons = "skipped", [e.skip]
            continue
        if e.error:
            e.status, e.reasons = ("error" if e.gated or e.compat or e.role == "artifact" else "info"), [e.error]
            continue
        e.results = [_case_metrics(c, out, reference.outputs[k], scale) for k, (c, out) in enumerate(zip(cases, e.outputs))]
        e.summary = _summarise(e.results, ref_y)
        if e.role == "reference":
            e.status = "reference"
        else:
            _verdict(e)


def _localize(entries: list[Entry], feeds: list, cases: list, fused) -> None:
    """For each failing ONNX row: the layer where it departs from the reference, on its worst case."""
    passing_fp32_onnx = [e.path for e in entries if e.kind == "onnx" and e.status == "pass" and e.precision == "fp32"]
    for e in entries:
        if e.kind != "onnx" or e.status != "fail":
            continue
        worst = _worst_case(e)
        try:
            with _quiet_polygraphy():
                found = localize_onnx(e.path, e.precision, feeds[worst], torch_model=fused, ref_onnx=passing_fp32_onnx)
        except Exception as ex:  # the verdict stands without it; say why it is missing
            found = Localization("none", "", 0, 0.0, 0.0, None, False,
                                 f"localization failed: {type(ex).__name__}: {first_line(ex)}", [])
        found.case = {"image": cases[worst][0], "lr_size": list(cases[worst][1])}
        e.localization = found


def _diagnose_openvino_int8(e: Entry, feed: dict, min_psnr: float) -> None:
    """Put the measured cause of a failing OpenVINO int8 row into its reasons (`openvino_int8.diagnose`)."""
    from .openvino_int8 import diagnose

    try:
        with _quiet_polygraphy():
            d = diagnose(e.path, lambda p: open_runner(p, "openvino", name="diagnose"), [feed], min_psnr)
        text = d.reason()
    except Exception as ex:  # the verdict stands without it; say why the cause is missing
        text = f"cause not measured: {type(ex).__name__}: {first_line(ex)}"
    e.reasons.insert(len(e.reasons) - bool(e.context), text)


def _worst_case(e: Entry) -> int:
    return max(range(len(e.results)), key=lambda k: e.results[k].badness())


def _tool_versions(entries) -> dict:
    tv = tool_versions()
    if any(e.runner == "openvino-cpu" and not e.skip for e in entries):
        from .openvino_runner import openvino_version

        tv["openvino"] = openvino_version()
    if any(e.runner == "ncnn-cpu" and not e.skip for e in entries):
        from .ncnn_runner import ncnn_version

        tv["ncnn"] = ncnn_version()
    return tv


def _report(entries, loaded, ref, image_paths, images, sizes, thresholds, atol, min_psnr, case_info,
            ref_y) -> ParityReport:
    gated = [e for e in entries if e.gated and e.role != "reference"]
    return ParityReport(
        created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        passed=all(e.status in ("pass", "skipped") for e in gated),
        tool_versions=_tool_versions(entries),
        reference=Reference(str(ref), loaded.sha256, loaded.variant, loaded.scale, loaded.upsampler, loaded.fused,
                            "torch-cpu fp32, fused" + ("" if loaded.fused else " from the unfused checkpoint")),
        images=[{"name": p.stem, "path": str(p)} for p in image_paths],
        image_source="user folder" if images else "bundled held-out photos from scikit-image",
        sizes=[list(s) for s in sizes], thresholds=dict(thresholds),
        overrides={"atol": atol, "min_psnr": min_psnr},
        reference_quality=ReferenceQuality(ref_y, float(np.mean([c.reference_ssim for c in case_info])),
                                  float(np.mean([c.bicubic_y_psnr for c in case_info])),
                                  float(np.mean([c.bicubic_ssim for c in case_info]))),
        cases=case_info, artifacts=[e.row() for e in entries],
        notes=[f"{e.name}: skipped, {e.skip}" for e in entries if e.skip])
