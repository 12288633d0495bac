"""parity_rows: the rows of a parity run. The fp32 torch reference and its derived torch models, each
artifact on its own runtime, the same file on the other runtimes that can run it (compatibility rows)
and an int8 file on ONNX Runtime's native kernels. Each row knows how to make its Polygraphy runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .artifact import sha256_file
from .checkpoint import load_model
from .cpu import isa
from .errors import ParagonError, require_file
from .onnx_graph import read_metadata
from .parity_report import CaseResult, Localization, PolygraphyCheck, Row, Summary
from .runners import (RUNTIMES, RuntimeUnavailable, TorchCpuRunner, artifact_kind, engine_precision, onnx_runner,
                      open_runner, resolve_runtime)
from .verify import Limits

RUNNER_LABELS = {"torch": "torch-cpu", "onnxruntime": "onnxrt-cpu", "openvino": "openvino-cpu",
                 "tensorrt": "tensorrt", "ncnn": "ncnn-cpu"}


@dataclass
class Entry:
    """One thing that runs and gets compared: the reference, a derived torch model or an artifact."""

    name: str
    role: str  # reference | derived | artifact | runtime (the same file on another runtime)
    kind: str  # torch | checkpoint | onnx | engine | ncnn
    runner: str  # RUNNER_LABELS values | onnxrt-cpu-native
    precision: str
    precision_source: str
    gated: bool = True
    path: Path | None = None
    sha256: str | None = None
    make_runner: Callable | None = None
    note: str = ""
    skip: str | None = None
    error: str | None = None
    outputs: list = field(default_factory=list)
    status: str = ""
    reasons: list = field(default_factory=list)
    results: list[CaseResult] = field(default_factory=list)
    summary: Summary | None = None
    polygraphy: PolygraphyCheck | None = None
    localization: Localization | None = None
    limits: Limits | None = None
    compat: bool = False  # a runtime row: judged PASS/FAIL, gating only when its runtime is required
    context: str = ""  # appended to a failing row's reasons (what the failure is attributed to)

    def row(self) -> Row:
        """What the report keeps of this entry once it has run and been judged."""
        return Row(self.name, self.role, self.kind, str(self.path) if self.path else None, self.sha256, self.runner,
                   self.precision, self.precision_source, self.gated, self.status, self.reasons, self.note,
                   self.limits, self.summary, self.polygraphy, self.results, self.localization)


def classify(path: Path) -> str:
    """checkpoint | onnx | engine | ncnn, from the one suffix table (`runners.SUFFIXES`)."""
    return artifact_kind(path)


def _unique(name: str, taken: set) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}#{i}", i + 1
    taken.add(out)
    return out


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def artifact_entry(path: Path, ref_scale: int, taken: set, runtime: str | None = None, *,
                    role: str = "artifact", gated: bool = True) -> Entry:
    """One row: the artifact on `runtime` (default: its own). A runtime that cannot run here makes the
    row skipped with the install hint; a file that cannot be opened makes it an error row."""
    kind = classify(path)
    rt = resolve_runtime(path, runtime)
    require_file(path, "artifact")
    name = _unique(path.name if role == "artifact" else f"{path.name} [{rt}]", taken)
    e = Entry(name, role, kind, RUNNER_LABELS[rt], "fp32", "", gated=gated, path=path, sha256=sha256_file(path))
    try:
        runner = open_runner(path, rt, name=name)
    except RuntimeUnavailable as ex:
        e.skip = str(ex)
        if kind == "engine":
            e.precision, e.precision_source = engine_precision(path)
        return e
    except ParagonError as ex:
        e.error = str(ex)
        return e
    info = runner.info
    e.precision, e.precision_source = info.precision, info.precision_source
    e.make_runner = lambda r=runner: r
    if kind == "checkpoint":
        loaded = runner.loaded
        if loaded.scale != ref_scale:
            e.error = f"x{loaded.scale} model, but the reference is x{ref_scale}"
        e.note = f"{loaded.variant}, {'fused' if loaded.fused else 'unfused (static kernels)'}"
    elif rt == "onnxruntime" and e.precision == "int8":
        e.note = "Q/DQ reference semantics (the same on every CPU)"
    elif rt == "openvino":
        e.note, e.context = _openvino_context(e.precision)
    elif rt == "ncnn":
        from .ncnn_runner import ncnn_version

        e.note = f"ncnn {ncnn_version()} CPU on {isa()}, fp32 arithmetic ({e.precision} weights)"
    return e


def _openvino_context(precision: str) -> tuple[str, str]:
    """(note, what a failure is attributed to) for an OpenVINO row."""
    from .openvino_runner import openvino_version

    where = f"OpenVINO {openvino_version()} CPU on {isa()}"
    if precision != "int8":
        return f"{where}, f32 inference precision", ""
    # A failing row's cause is measured afterwards (`parity._diagnose_openvino_int8`), not assumed from the ISA.
    return (f"{where}: OpenVINO's own int8 kernels (numerics depend on the ISA)",
            f"do not ship this file to OpenVINO on {isa()} CPUs (`paragon-export int8 --openvino` writes one for it)")


def runtime_entries(art: Entry, ref_scale: int, taken: set, runtimes, required) -> list[Entry]:
    """Rows for the same file on the other runtimes that can run it (OpenVINO for ONNX): compatibility
    rows, judged with the same limits; they gate only when their runtime is `required`."""
    if art.error or art.path is None:
        return []
    out = []
    # a file made for one runtime (the OpenVINO int8 file) is judged there, not only checked for compatibility
    target = read_metadata(art.path).get("target_runtime") if art.kind == "onnx" else None
    for rt in RUNTIMES[art.kind][1:]:
        if runtimes is not None and rt not in runtimes:
            continue
        e = artifact_entry(art.path, ref_scale, taken, rt, role="runtime", gated=rt in required or rt == target)
        e.compat = True
        out.append(e)
    return out


def native_int8_entry(art: Entry, taken: set) -> Entry:
    """The same int8 file through ONNX Runtime's fused integer kernels: what this CPU's runtime does,
    reported (not gated), because those numbers depend on the ISA."""
    name = _unique(f"{art.name} [native {isa()}]", taken)
    return Entry(name, "derived", "onnx", "onnxrt-cpu-native", "int8", art.precision_source, gated=False,
                 path=art.path, sha256=art.sha256,
                 make_runner=lambda p=art.path, n=name: onnx_runner(p, name=n, native_int8=True),
                 note=f"ONNX Runtime's native integer kernels on this CPU ({isa()}); differs between ISAs")


def reference_entries(ref: Path, taken: set, scale: int | None = None):
    loaded = load_model(ref, scale=scale)
    if loaded.fused:
        fused, dynamic = loaded.model, None
    else:
        missing = loaded.model.uninitialized_kernels()
        if missing:
            raise ParagonError(f"reference {ref}: {len(missing)} tracked kernels were never initialised; "
                               "fuse it with `paragon-export fuse --calibrate-kernels DIR` and use the fused file")
        fused = loaded.model.fuse_for_release().eval()
        dynamic = loaded.model
        dynamic.set_dynamic_inference(True)
    sha = loaded.sha256
    name = _unique(f"reference ({ref.name})", taken)
    entries = [Entry(name, "reference", "torch", "torch-cpu", "fp32", "reference", gated=False, path=ref,
                     sha256=sha, make_runner=lambda: TorchCpuRunner(fused, name=name),
                     note="fp32 torch, fused (deploy form)")]
    half = _unique("torch fp16", taken)
    entries.append(Entry(half, "derived", "torch", "torch-cpu", "fp16", "torch .half() arithmetic",
                         make_runner=lambda: TorchCpuRunner(fused, name=half, dtype=torch.float16),
                         note="fused reference in torch half precision (ORT CPU fp16 upcasts internally)"))
    if dynamic is not None:
        dyn = _unique("torch dynamic (unfused)", taken)
        entries.append(Entry(dyn, "derived", "torch", "torch-cpu", "fp32", "unfused, per-image kernels", gated=False,
                             make_runner=lambda: TorchCpuRunner(dynamic, name=dyn),
                             note="per-image generated kernels as in training; the gap to the fused reference is the train/deploy gap"))
    return loaded, fused, entries
