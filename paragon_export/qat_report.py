"""qat_report: the QAT report (`QATReport`, its parts in `qat_result`): how `qat` builds it, held-out
quality of the torch student in the int8 report's format, and the fp32 / PTQ / QAT table the
command prints (`table`, `markdown`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .metrics import psnr, psnr_y, ssim_y
from .records import Record, optional
from .int8_eval import ImageScore, Latency, NativeKernels, Quality, Scores
from .int8_report import Output
from .qat_result import ExportInfo, ModelInfo, ModelQualities, PTQBaseline, Recipe, Training, QATVerification


@torch.no_grad()
def _sr(model, lr: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None]).numpy()[0].transpose(1, 2, 0)


def torch_quality(model, holdout, scale: int, fp32_ref: list[np.ndarray] | None) -> Quality:
    """Held-out figures of a torch model in the int8 report's format (`int8_eval.Evaluator`):
    Y-PSNR/SSIM vs HR and PSNR vs the fp32 outputs `fp32_ref`, per image and mean."""
    per = []
    for i, h in enumerate(holdout):
        y = _sr(model, h.lr)
        vs_fp32 = None if fp32_ref is None else psnr(np.clip(y, 0, 1), np.clip(fp32_ref[i], 0, 1))
        y_psnr, ssim = (None, None) if h.hr is None else (psnr_y(y, h.hr, scale), ssim_y(y, h.hr, scale))
        per.append(ImageScore(h.name, list(h.lr.shape[:2]), vs_fp32, y_psnr, ssim))
    return Quality.of(per)


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def build_report(*, job, run, base, graph, info: ExportInfo, fp32_graph, fp32_path: Path, qat_path: Path, ev,
                 excluded: dict, rest, verification: QATVerification, threads: int, start_step: int | None,
                 train_s: float, progress) -> QATReport:
    """The report of a finished run (`qat.qat`'s `_Job`, `qat_run.QATRun` and `qat_run.Baselines`): quality
    of every model on the held-out images, ORT CPU latency, the recipe, checks, training history and
    verification. `wall_seconds` and `output` are the caller's, once the file is written."""
    from .int8_check import inspect_qdq, mac_shares
    from .int8_eval import latency, native_vs_reference
    from .int8_remainder import dtype_mac_shares

    loaded, cal, s, ptq = job.loaded, job.cal, job.recipe, base.ptq
    checks = inspect_qdq(graph)
    fp32 = ev.fp32
    quality = ModelQualities(fp32, base.ptq_modelopt,
                             torch_quality(run.student, cal.holdout, loaded.scale, ev.ref).with_drop(fp32),
                             ev.quality(qat_path), None if ptq is None else ptq.quality)
    models = {"fp32": fp32_path, "qat_int8": qat_path}
    if ptq is not None and Path(ptq.model).is_file():
        models["ptq_int8"] = Path(ptq.model)
    progress("timing on ONNX Runtime CPU")
    lat = latency(models, cal.holdout[0].lr, threads=threads)
    first = start_step if start_step is not None else 0
    return QATReport(
        model=ModelInfo(str(loaded.path), loaded.sha256, loaded.variant, loaded.scale, loaded.upsampler, job.fusion),
        calibration=cal.summary(),
        recipe=Recipe(s.magic, excluded, rest.summary(), dtype_mac_shares(graph, mac_shares(fp32_graph)),
                      base.keep_float, base.unmatched_float_nodes, s.as_dict()),
        checks={k: v for k, v in checks.items() if k != "quantized_nodes"}
               | {"quantized_nodes": len(checks["quantized_nodes"])},
        export=info,
        training=Training(run.step, start_step, run.step - first, round(train_s, 2),
                          round(train_s / max(1, run.step - first), 4), s.lr, s.batch, s.patch, s.gt_weight,
                          int(len(job.patches.lr)), run.history),
        verification=verification,
        native_kernels=native_vs_reference(qat_path, [h.lr for h in cal.holdout], threads),
        quality=quality,
        ptq=ptq,
        latency=lat,
    )


@dataclass
class QATReport(Record):
    """A finished QAT run: the model, calibration set (`calibration` summary), recipe, Q/DQ checks of the
    shipped graph (`int8_check.inspect_qdq`, node list as a count), export, training, verification,
    native-kernel check (`int8_eval.native_vs_reference`), quality of every model, the PTQ baseline
    (None: --no-ptq) and latency; `wall_seconds` and `output` once the file is written."""

    model: ModelInfo
    calibration: dict
    recipe: Recipe
    checks: dict
    export: ExportInfo
    training: Training
    verification: QATVerification
    native_kernels: NativeKernels | None
    quality: ModelQualities
    ptq: PTQBaseline | None
    latency: Latency
    wall_seconds: float | None = optional()
    output: Output | None = optional()

    def to_json(self) -> dict:
        """The qat_report.json document."""
        return {"command": "qat", **super().to_json()}

    # ------------------------------------------------------------ rendering
    _HEAD = ("model", "Y-PSNR", "SSIM", "PSNR/fp32", "ms", "x fp32", "Q/DQ", "float", "TensorRT")
    _WIDTHS = (-34, 7, 7, 9, 8, 6, 9, 5)  # all but the last column; negative: left-aligned

    def rows(self) -> list[tuple[str, ...]]:
        """fp32 / PTQ / QAT side by side, as table cells (`_HEAD`), in the int8 command's table layout."""
        q, chk = self.quality, self.checks
        rows = [("fp32 (ONNX)", q.fp32.mean, "fp32", "-", "-", "-")]
        if q.ptq_int8 is not None:
            p = self.ptq
            rows.append((f"PTQ int8 (int8 command, {p.method})", q.ptq_int8.mean, "ptq_int8",
                         f"{p.checks['q_nodes']}/{p.checks['dq_nodes']}", str(len(p.kept_float)), "yes"))
        rows.append(("PTQ int8 (ModelOpt max, torch)", q.ptq_modelopt.mean, None, "-", "-", "-"))
        rows.append((f"QAT int8 ({self.training.steps} steps)", q.qat_int8.mean, "qat_int8",
                     f"{chk['q_nodes']}/{chk['dq_nodes']}", str(len(chk["float_nodes"])),
                     "yes" if not self.export.trt_blockers else "NO"))
        return [self._cells(*r) for r in rows]

    def _cells(self, name: str, m: Scores, key: str | None, qdq: str, kept: str, trt: str) -> tuple[str, ...]:
        ms, ratio = self.latency.median_ms, self.latency.ratio_vs_fp32
        vs = "-" if name.startswith("fp32") else f"{m.psnr_vs_fp32:.2f}"
        y = f"{m.y_psnr:.3f}" if m.y_psnr is not None else "-"
        s = f"{m.ssim:.4f}" if m.ssim is not None else "-"
        t = (f"{ms[key]:.2f}", f"{ratio[key]:.2f}") if key in ms else ("-", "-")
        return (name, y, s, vs, *t, qdq, kept, trt)

    def notes(self) -> list[str]:
        """The lines under the table: held-out set and timing, gains, MAC shares, verification, native kernels."""
        q, lat, chk, v = self.quality, self.latency, self.checks, self.verification
        held = self.calibration["holdout_images"]
        lines = [f"held-out: {len(held)} images ({', '.join(held)}), latency: median of {lat.repeats} at "
                 f"{lat.input[2]}x{lat.input[3]}, {lat.threads} thread(s)"]
        fp = q.fp32.mean.y_psnr
        if fp is not None:
            gains = [f"QAT vs fp32 {q.qat_int8.mean.y_psnr - fp:+.3f} dB"]
            if q.ptq_int8 is not None:
                gains.append(f"QAT vs PTQ {q.qat_int8.mean.y_psnr - q.ptq_int8.mean.y_psnr:+.3f} dB")
            lines.append("Y-PSNR: " + ", ".join(gains))
        sh = self.recipe.mac_share
        if sh:
            lines.append(f"QAT conv MACs: int8 {100 * sh['int8']:.1f}%, fp16 {100 * sh['fp16']:.1f}%, "
                         f"fp32 {100 * sh['fp32']:.1f}% ({len(chk['float_nodes'])} convs without a TensorRT int8 kernel)")
        sizes = ", ".join(f"{g}: max abs {r.max_abs:.2e}, PSNR {r.psnr:.1f} dB"
                          for g, r in v.export.groups.items() if r.max_abs is not None)
        lines.append(f"ORT (Q/DQ reference semantics) vs torch fake quant, fp32 remainder: {sizes}")
        if v.remainder:
            lines.append(f"fp16 remainder vs fp32 remainder (ORT): {v.remainder.describe('psnr')}")
        if self.native_kernels:
            lines.append(self.native_kernels.line())
        return lines

    def table(self) -> str:
        """The fixed-width table the command prints, and its notes."""
        def line(cells):
            padded = (c.ljust(-w) if w < 0 else c.rjust(w) for c, w in zip(cells, self._WIDTHS))
            return " ".join(padded) + "  " + cells[-1]

        head = line(self._HEAD)
        return "\n".join([head, "-" * len(head), *map(line, self.rows()), *self.notes()])

    def markdown(self) -> str:
        """The table and its notes as Markdown."""
        cells = [self._HEAD, ("---", *["---:"] * 7, "---"), *self.rows()]
        return "\n".join(["| " + " | ".join(c) + " |" for c in cells] + [""] + [f"- {n}" for n in self.notes()])
