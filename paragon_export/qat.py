"""qat: quantization-aware fine-tuning with NVIDIA ModelOpt, exported as a Q/DQ INT8 ONNX.

    qat(ckpt, out_dir, QATRecipe(steps=, lr=, batch=, patch=, gt_weight=, magic=, ...), *,
        data_dir=None, resume=False, force=False, ptq_baseline=True, ...) -> (Artifact, report)

Flow: load the checkpoint and fuse it (QAT trains the deployed graph, the one TensorRT runs); keep
a deep copy as the fp32 teacher; insert int8 fake quantizers with `mtq.quantize` calibrated (max)
on the shared calibration set (`calibration.build_calibration_set` on the same folder); fine-tune
the student with Adam (linear warm-up, then cosine to 0) on seeded random patches of the calibration
images (`qat_data`): L1 to the teacher's output, plus `gt_weight` x L1 to the HR ground truth (`qat_run`);
export the student with the TorchScript exporter to a Q/DQ ONNX with dynamic H/W, simplify it, check
every zero point is int8 0, and verify ORT against the torch fake-quant model on real photos at two
sizes (`qat_export`). The held-out split of the calibration set gives the progress bar's PSNR and the
report (`qat_report`). A run is resumable from the state `qat_run` saves in the output folder.

Float layers: QAT quantizes every conv TensorRT has an int8 kernel for and leaves the rest
(`int8_check.trt_int8_exclusions`: ModelOpt's small-channel rules) to the fp16 remainder, so it
ships the full int8 share PTQ's accuracy search cannot afford; the fine-tuning recovers the
accuracy instead. The exported Q/DQ graph gets the same fp16 remainder (with its overflow guard)
as the int8 command's, and is verified as shipped. The PTQ baseline (the `int8` command on the
same FP32 graph and calibration set) is reported beside it.

Magic-Conv filters: `magic="int8"` (default) quantizes the resampling ConvTranspose; its depthwise
1x7/7x1 sharpen convs have no TensorRT int8 kernel and stay fp16. `magic="float"` keeps all three
fp16. The README has the measured figures for both.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from paragon_export.calibration import CalibrationSet

from .artifact import Artifact, atomic_output, check_output, sha256_file
from .checkpoint import load_model
from .fuse import FusionCheck
from .errors import ParagonError
from .qat_data import TrainPatches, calibration_image_paths, train_patches
from .qat_export import REMAINDER_MIN_PSNR, check_verification, export_qdq, remainder_effect, verify_qdq
from .qat_recipe import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_PATCH, DEFAULT_STEPS, QATRecipe
from .qat_report import QATReport, build_report, json_default, torch_quality
from .int8_report import Output
from .qat_result import HistoryPoint, PTQBaseline, QATVerification
from .qat_run import STATE_JSON, Baselines, QATRun, check_diverged, read_state, save_state
from .verify import VERIFY_SIZES

__all__ = ["qat", "QATRecipe", "QATReport", "DEFAULT_STEPS", "DEFAULT_LR", "DEFAULT_BATCH", "DEFAULT_PATCH"]

REPORT_NAME = "qat_report.json"
VERIFY_MIN_PSNR = 40.0  # ORT's int8 kernels vs torch fake quant differ by rounding flips only


def onnx_name(variant: str, scale: int, opset: int) -> str:
    return f"{variant}_x{scale}_int8_qat_op{opset}.onnx"


def qat(ckpt: Path | str, out_dir: Path | str, recipe: QATRecipe | None = None, *,
        data_dir: Path | str | None = None, resume: bool = False, force: bool = False, opset: int = 17,
        verify_sizes=VERIFY_SIZES, ptq_baseline: bool = True, threads: int = 1, train_threads: int | None = None,
        progress: Callable[[str], None] | None = None, bar: bool = True) -> tuple[Artifact, QATReport]:
    """Checkpoint + images -> QAT fine-tuned, verified Q/DQ INT8 ONNX in `out_dir` (module docstring),
    made as `recipe` says (default `QATRecipe()`). Returns the ONNX Artifact (meta: metadata + report)
    and the report (`QATReport`; its JSON is `qat_report.json`). `threads`: ORT threads for evaluation and timing;
    `train_threads`: torch threads (None: torch's default; on a machine shared with other jobs, fewer
    threads are often faster). `progress` gets one line per stage; `bar`: a tqdm bar while training."""
    if train_threads is not None and train_threads < 1:
        raise ParagonError(f"train threads must be >= 1, got {train_threads}")
    with _torch_threads(train_threads):
        return _qat(ckpt, Path(out_dir), (recipe or QATRecipe()).check(), data_dir=data_dir, resume=resume,
                    force=force, opset=opset, verify_sizes=verify_sizes, ptq_baseline=ptq_baseline, threads=threads,
                    progress=progress or (lambda _m: None), bar=bar)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op thread count set to `n` for the block (None: left as it is)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


@dataclass
class _Job:
    """What one qat call works on, checked before anything is trained."""

    loaded: object  # checkpoint.Loaded
    fused: torch.nn.Module
    fusion: FusionCheck | None  # None: the checkpoint was fused already
    cal: CalibrationSet
    patches: TrainPatches
    recipe: QATRecipe
    out_dir: Path
    onnx_path: Path
    report_path: Path
    ident: dict  # what a resumed run must share with the saved one
    saved: tuple | None  # (state JSON, tensors) when resuming


def _job(ckpt, out_dir: Path, data_dir, recipe: QATRecipe, resume: bool, force: bool, opset: int, progress) -> _Job:
    from paragon_export.calibration import build_calibration_set

    from .export_onnx import fused_model
    from .int8_remainder import FP16_QDQ_OPSET

    loaded = load_model(ckpt)
    # The fp16 remainder's Q/DQ scales are fp16, which needs opset 19.
    onnx_path = out_dir / onnx_name(loaded.variant, loaded.scale, max(opset, FP16_QDQ_OPSET))
    report_path = out_dir / REPORT_NAME
    for p in (onnx_path, report_path):
        check_output(p, force=force)
    if not resume and (out_dir / STATE_JSON).exists() and not force:
        raise ParagonError(f"{out_dir} holds a saved QAT run: pass --resume to continue it or --force to start over")
    saved = read_state(out_dir) if resume else None
    fused, fusion = fused_model(loaded)
    data_dir = Path(data_dir) if data_dir is not None else None
    cal = build_calibration_set(data_dir, scale=loaded.scale, **recipe.calibration())
    if not cal.holdout or any(h.hr is None for h in cal.holdout):
        raise ParagonError("qat needs held-out HR images to measure quality (give a folder of >= 2 HR photos)")
    for sk in cal.skipped:
        progress(f"warning: skipped {sk}")
    patches = train_patches(calibration_image_paths(data_dir, cal.calib_images), scale=loaded.scale,
                            patch=recipe.patch, seed=recipe.seed)
    ident = {"source_sha256": loaded.sha256, "calibration_fingerprint": cal.fingerprint, **recipe.identity()}
    return _Job(loaded, fused, fusion, cal, patches, recipe, out_dir, onnx_path, report_path, ident, saved)


def _qat(ckpt, out_dir: Path, recipe: QATRecipe, *, data_dir, resume, force, opset, verify_sizes, ptq_baseline,
         threads, progress, bar) -> tuple[Artifact, QATReport]:
    import onnx

    from .int8 import CALIB_PROBES
    from .int8_check import trt_int8_exclusions
    from .int8_eval import Evaluator
    from .int8_remainder import plan_remainder

    t_start = time.perf_counter()
    job = _job(ckpt, out_dir, data_dir, recipe, resume, force, opset, progress)
    cal, loaded = job.cal, job.loaded
    with tempfile.TemporaryDirectory(prefix="paragon-qat-") as tmp_name:
        tmp = Path(tmp_name)
        progress("exporting the fused fp32 model to ONNX (reference)")
        fp32_path = _fp32_onnx(job.fused, loaded, tmp, opset)
        ev = Evaluator(fp32_path, cal, loaded.scale, threads)
        fp32_graph = onnx.load(str(fp32_path))
        excluded = trt_int8_exclusions(fp32_graph)
        rest = plan_remainder("fp16", fp32_graph, [cal.batch(i) for i in range(min(len(cal), CALIB_PROBES))])
        job.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            run, base = _resumed(job, progress)
        else:
            run, base = _started(job, fp32_path, ev, excluded, ptq_baseline, threads, force, progress)
            save_state(run, job.out_dir, base.to_json())  # step 0: a run interrupted in its first steps resumes without PTQ
        start_step = run.step
        train_s = _train(run, job.patches, cal.holdout, job.out_dir, base.to_json(), bar=bar)

        progress("exporting Q/DQ ONNX and verifying it on ONNX Runtime")
        graph, info, meta, verification = _export_verified(run, job, rest, opset, verify_sizes)
        qat_path = tmp / "qat.onnx"
        onnx.save(graph, str(qat_path))
        report = build_report(job=job, run=run, base=base, graph=graph, info=info, fp32_graph=fp32_graph,
                              fp32_path=fp32_path, qat_path=qat_path, ev=ev, excluded=excluded, rest=rest,
                              verification=verification, threads=threads,
                              start_step=start_step if resume else None, train_s=train_s, progress=progress)
        with atomic_output(job.onnx_path, force=force) as t:
            t.write_bytes(qat_path.read_bytes())
    report.wall_seconds = round(time.perf_counter() - t_start, 1)
    report.output = Output(str(job.onnx_path), sha256_file(job.onnx_path), str(job.report_path))
    doc = report.to_json()
    with atomic_output(job.report_path, force=force) as t:
        t.write_text(json.dumps(doc, indent=1, default=json_default))
    return Artifact(job.onnx_path, "onnx-int8", {"metadata": meta, **doc}), report


def _resumed(job: _Job, progress) -> tuple[QATRun, Baselines]:
    """The saved run, checked against this call's checkpoint, images and recipe."""
    doc, tensors = job.saved
    s = job.recipe
    changed = [k for k, v in job.ident.items() if doc.get(k) != v]
    if changed:
        raise ParagonError(f"--resume: the saved run differs in {', '.join(changed)} "
                           "(same checkpoint, images and settings needed; --force starts over)")
    if doc["step"] > s.steps:
        raise ParagonError(f"--resume: the saved run is at step {doc['step']}, past --steps {s.steps}")
    base = Baselines.from_json(doc, job.ident)
    first = torch.from_numpy(job.cal.batch(0))
    # Calibrating on one batch only creates the amax buffers; the saved values replace them.
    run = QATRun.create(job.fused, lambda m: m(first), s, job.loaded.scale, base.keep_float)
    run.load_tensors(tensors)
    run.step, run.history = int(doc["step"]), [HistoryPoint.from_json(h) for h in doc.get("history", [])]
    progress(f"resuming at step {run.step} of {s.steps}")
    return run, base


def _started(job: _Job, fp32_path: Path, ev, excluded: dict, ptq_baseline: bool, threads: int,
             force: bool, progress) -> tuple[QATRun, Baselines]:
    """A new run: the PTQ baseline, then the student calibrated with TensorRT's float convs left float."""
    cal, scale = job.cal, job.loaded.scale
    ptq = _ptq(fp32_path, cal, job.out_dir / "ptq", threads, force, progress) if ptq_baseline else None
    keep_float, unmatched = _float_quantizers(job.fused, excluded)
    progress(f"inserting int8 fake quantizers (ModelOpt), calibrating on {len(cal.crops)} crops; "
        f"{len(excluded)} convs without a TensorRT int8 kernel stay fp16")
    run = QATRun.create(job.fused, cal.forward_loop, job.recipe, scale, keep_float)
    ptq_modelopt = torch_quality(run.student, cal.holdout, scale, ev.ref).with_drop(ev.fp32)
    run.history.append(HistoryPoint(0, None, ptq_modelopt.mean.y_psnr))
    return run, Baselines(job.ident, ptq, ptq_modelopt, keep_float, unmatched)


def _export_verified(run: QATRun, job: _Job, rest, opset: int, verify_sizes):
    """The student as a Q/DQ ONNX with the fp16 remainder and metadata: the export verified against the
    torch fake-quant model, the remainder against the export. Returns (graph, export info, metadata, verification)."""
    from .onnx_graph import set_metadata

    loaded, cal = job.loaded, job.cal
    graph, info = export_qdq(run.student, opset=opset)
    if info.trt_blockers:
        raise ParagonError(f"the QAT Q/DQ model is not TensorRT-compatible: {'; '.join(info.trt_blockers)}")
    meta = {"producer": "paragon-export", "variant": loaded.variant, "scale": str(loaded.scale),
            "upsampler": loaded.upsampler, "precision": "int8-qdq", "quantization": "qat (nvidia-modelopt)",
            "io_dtype": "float32", "opset": str(opset), "source_sha256": loaded.sha256,
            "calibration_fingerprint": cal.fingerprint, "qat_steps": str(run.step),
            "magic_filters": job.recipe.magic, "input_shape": "Nx3xHxW", "layout": "NCHW RGB [0,1]",
            "min_size": f"{loaded.min_size}x{loaded.min_size}"}
    # The export is checked before the fp16 remainder, whose own effect is measured apart
    # (the fp32 fake-quant student cannot show fp16 rounding ahead of each QuantizeLinear).
    export = verify_qdq(graph, run.student, loaded.scale, verify_sizes)
    plain, graph = graph, rest.apply(graph)
    set_metadata(graph, meta)
    verification = QATVerification(export, remainder_effect(plain, graph, loaded.scale, verify_sizes),
                                VERIFY_MIN_PSNR, REMAINDER_MIN_PSNR)
    check_verification(verification)
    return graph, info, meta, verification


def _train(run: QATRun, patches: TrainPatches, holdout, out_dir: Path, extra: dict, *, bar: bool) -> float:
    """Steps run.step..recipe.steps with periodic held-out PSNR and state saves. Returns seconds."""
    from tqdm import tqdm

    s = run.recipe
    t0 = time.perf_counter()
    shown = tqdm(total=s.steps, initial=run.step, desc="QAT", unit="step", disable=not bar, dynamic_ncols=True)
    losses: list[float] = []
    held = run.history[-1].heldout_y_psnr if run.history else None
    try:
        while run.step < s.steps:
            losses.append(check_diverged(run.train_step(patches), run.step, s.lr))
            shown.update(1)
            if run.step % s.eval_every == 0 or run.step == s.steps:
                held = torch_quality(run.student, holdout, run.scale, None).mean.y_psnr
                run.history.append(HistoryPoint(run.step, float(np.mean(losses)), held))
                losses = []
            recent = losses[-20:] or [run.history[-1].distill_l1]
            shown.set_postfix_str(f"distill L1 {np.mean(recent):.2e}" + (f", held-out Y-PSNR {held:.3f} dB" if held else ""))
            if run.step % s.save_every == 0 and run.step < s.steps:
                save_state(run, out_dir, extra)
    except KeyboardInterrupt:
        shown.close()
        save_state(run, out_dir, extra)
        raise ParagonError(f"interrupted at step {run.step}/{s.steps}; state saved in {out_dir} "
                           "(run the same command with --resume to continue)") from None
    shown.close()
    if s.steps > 0:
        save_state(run, out_dir, extra)
    return time.perf_counter() - t0


def _fp32_onnx(fused, loaded, tmp: Path, opset: int) -> Path:
    """The fused model as a verified FP32 ONNX (the int8 evaluator's reference and PTQ's input)."""
    from .export_onnx import export_model, onnx_filename

    path = tmp / onnx_filename(loaded.variant, loaded.scale, "fp32", opset)
    export_model(fused, path, meta={"scale": str(loaded.scale), "variant": loaded.variant,
                                    "source_sha256": loaded.sha256}, opset=opset, force=True)
    return path


def _ptq(fp32: Path, cal, out: Path, threads: int, force: bool, progress) -> PTQBaseline:
    """The `int8` command with its defaults on the same FP32 graph and calibration set; its model and
    report are written to `out` (the user gets the PTQ artifact too)."""
    from .int8 import quantize_int8

    progress("PTQ baseline: paragon-export int8 (defaults) on the same model and calibration set")
    r = quantize_int8(fp32, out, calib=cal, peer=False, threads=threads, force=force,
                      progress=lambda m: progress(f"  {m}"))
    return PTQBaseline(r.output.model, r.output.report, r.quality.int8,
                       r.checks.to_json(), r.mixed_precision.kept_float, r.recipe["method"], r.mixed_precision.met)


def _float_quantizers(fused, excluded: dict) -> tuple[list[str], list[str]]:
    """Quantizers to disable: those of the convs TensorRT has no int8 kernel for (`excluded`, from
    `int8_check.trt_int8_exclusions`, by ONNX node name); they run fp16 in the shipped file.
    Returns (quantizer names, unmatched nodes)."""
    from .qat_quant import quantizers_for_nodes

    return quantizers_for_nodes(fused, sorted(excluded))
