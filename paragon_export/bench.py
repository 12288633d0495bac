"""`bench`: latency, throughput and peak memory of artifacts, as ratios against PyTorch eager.

Every artifact runs through the same `upscale.ModelRunner` (Polygraphy runners), on a crop of a real
photo, at a fixed thread count. Per LR size all runners are built and warmed up first, then the
timed runs go round-robin (one run of each artifact in turn), so load drift on a shared machine
hits every artifact alike. Latency is the runtime's own time for one 1x3xHxW inference
(Polygraphy's `last_inference_time`: input checks and our numpy glue excluded).

Peak memory: on Linux, the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after returning freed heap to the OS) over its resident size just before the
runner was built, through its build and warm-up: weights, runtime workspace and activations.
Elsewhere ru_maxrss is used, which cannot be reset: it is then a lower bound (0 when an earlier
artifact already peaked higher).

The limit: MACs per LR pixel (from the ONNX graph, or the checkpoint's conv calls), the GMAC/s that
achieves at the median latency, and that as a fraction of this core's fp32 peak measured by a small
probe at the same thread count (`roofline`).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .artifact import atomic_output, check_output
from .errors import ParagonError, require_file
from .memory import refuse_what_cannot_fit
from .images import load_image, sample_photo_paths
from .bench_report import BenchReport, BenchResult, BenchSettings, Skipped
from .roofline import Peak, artifact_macs_per_pixel, peak_info
from .runners import RUNTIMES, artifact_kind, resolve_runtime, runtime_unavailable
from .upscale import ModelRunner, open_model

DEFAULT_SIZES = [(256, 256)]


# ----------------------------------------------------------------------------------------------
# Memory.

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRss:
    """Peak resident-set rise over the current size, in MiB, for the code run inside the block."""

    def __init__(self) -> None:
        self.method = "ru_maxrss"
        self.mib = 0.0

    def __enter__(self) -> "PeakRss":
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"
        self._base = _status_kib("VmRSS") if self.method == "VmHWM" else self._maxrss_kib()
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self.method == "VmHWM" else self._maxrss_kib()
        self.mib = max(0, (peak or 0) - (self._base or 0)) / 1024

    @staticmethod
    def _maxrss_kib() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------------------
# What each artifact is.

def precision_of(runner: ModelRunner) -> str:
    return runner.runner.info.precision


def form_of(kind: str, runner: ModelRunner) -> str:
    if kind == "torch":
        return "eager " + ("fused" if runner.metadata.get("fused") == "True" else "unfused")
    return {"onnxruntime": "onnxruntime cpu", "openvino": "openvino cpu", "ncnn": "ncnn cpu"}.get(kind, kind)


def runtimes_for(path: Path, runtimes: tuple[str, ...] | None) -> list[str]:
    """The requested runtimes that can run `path` (its default runtime when none of them can)."""
    usable = [r for r in runtimes or () if r in RUNTIMES[artifact_kind(path)]]
    return usable or [resolve_runtime(path)]


# ----------------------------------------------------------------------------------------------
# The benchmark.

def bench_input(h: int, w: int) -> np.ndarray:
    """An HxW crop of a real photo (tiled by mirroring when the photo is smaller), as 1x3xHxW."""
    img = load_image(sample_photo_paths("eval")[0])  # astronaut, 512x512
    reps = (-(-h // img.shape[0]), -(-w // img.shape[1]))
    if reps != (1, 1):
        flip = [img, img[:, ::-1]]
        row = np.concatenate([flip[i % 2] for i in range(reps[1])], 1)
        img = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps[0])], 0)
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(img[top:top + h, left:left + w].transpose(2, 0, 1)[None])


def distinct_labels(paths: list[Path]) -> list[str]:
    """A label per artifact: its file name, or where names repeat the shortest path tail that tells
    the artifacts apart (release/int8/x.onnx vs qat/x.onnx), so no two table rows look identical."""
    labels = []
    for p in paths:
        parts = p.resolve().parts
        others = [q.resolve().parts for q in paths if q.resolve() != p.resolve()]
        n = 1
        while n < len(parts) and any(o[-n:] == parts[-n:] for o in others):
            n += 1
        labels.append("/".join(parts[-n:]))
    return labels


@dataclass
class _Entry:
    path: Path
    kind: str  # the runtime
    label: str = ""
    macs_per_pixel: float | None = None
    runner: ModelRunner | None = None
    precision: str = ""
    form: str = ""
    peak_mib: float = 0.0
    memory_method: str = ""
    times: list[float] = field(default_factory=list)
    skipped: str | None = None


def choose_baseline(paths: list[Path], baseline: Path | None) -> Path | None:
    """PyTorch eager reference: --baseline, else the first unfused checkpoint, else the first checkpoint."""
    if baseline is not None:
        if artifact_kind(baseline) != "checkpoint":
            raise ParagonError(f"--baseline {baseline} must be a PyTorch checkpoint")
        return baseline
    ckpts = [p for p in paths if artifact_kind(p) == "checkpoint"]
    if not ckpts:
        return None
    from .checkpoint import read_state_dict

    for p in ckpts:
        sd, _ = read_state_dict(p)
        if "body.0.blocks.0.transformer.dwconv.weight" not in sd:  # no fused dwconv: unfused
            return p
    return ckpts[0]


def bench(artifacts: list[Path | str], *, sizes: list[tuple[int, int]] | None = None, threads: int | None = None,
          runs: int = 20, warmup: int = 3, baseline: Path | str | None = None, json_path: Path | str | None = None,
          force: bool = False, progress: Callable[[str], None] | None = None,
          runtimes: tuple[str, ...] | None = None) -> BenchReport:
    """Benchmark every artifact at every LR size, each on every runtime of `runtimes` that can run it
    (default: its own runtime); returns (and optionally writes, as its `to_json`) the report."""
    paths = [Path(p) for p in artifacts]
    if not paths:
        raise ParagonError("no artifact given")
    for p in paths:
        artifact_kind(p)
        require_file(p, "artifact")
    if runs < 1 or warmup < 0:
        raise ParagonError("--runs must be >= 1 and --warmup >= 0")
    sizes = sizes or DEFAULT_SIZES
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads < 1:
        raise ParagonError("--threads must be >= 1")
    if json_path is not None:
        check_output(json_path, force=force)
    base = choose_baseline(paths, Path(baseline) if baseline else None)
    order = paths if base is None or base in paths else [base, *paths]
    refuse_what_cannot_fit(order, sizes, "bench")

    import torch

    torch.set_num_threads(threads)
    _absorb_one_time_costs(order, threads, runtimes)
    peak = peak_info(threads)
    labels = dict(zip(order, distinct_labels(order)))
    results, skipped = [], []
    for h, w in sizes:
        r, s = _bench_size(order, (h, w), runtimes, labels, base, threads=threads, runs=runs, warmup=warmup,
                           peak=peak, progress=progress)
        results += r
        skipped += s

    report = BenchReport(datetime.now(timezone.utc).isoformat(timespec="seconds"), _host(),
                         BenchSettings(threads, runs, warmup, [f"{h}x{w}" for h, w in sizes]), peak,
                         str(base) if base else None, results, skipped)
    if json_path is not None:
        with atomic_output(json_path, force=force) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _bench_size(order: list[Path], size: tuple[int, int], runtimes, labels: dict, base: Path | None, *, threads: int,
                runs: int, warmup: int, peak: Peak,
                progress: Callable[[str], None] | None) -> tuple[list[BenchResult], list[Skipped]]:
    """Every artifact on every runtime at one LR size, timed round-robin. Returns (results, skipped)."""
    h, w = size
    results, skipped = [], []
    x = bench_input(h, w)
    entries = [_Entry(p, rt, labels[p], artifact_macs_per_pixel(p, (h, w)))
               for p in order for rt in runtimes_for(p, runtimes)]
    try:
        for e in entries:
            _prepare(e, x, threads=threads, warmup=warmup)
            if e.skipped:
                skipped.append(Skipped(str(e.path), f"{h}x{w}", e.skipped))
            if progress:
                progress(f"{h}x{w} {e.path.name}: " + (f"skipped ({e.skipped})" if e.skipped else "ready"))
        live = [e for e in entries if not e.skipped]
        for _ in range(runs):
            for e in live:
                e.runner(x)
                e.times.append(e.runner.last_inference_time())
    finally:
        for e in entries:
            if e.runner is not None and not e.skipped:
                e.runner.__exit__(None, None, None)
    ref = next((e for e in entries if e.path == base and not e.skipped), None)
    ref_median = float(np.median(ref.times)) if ref else None
    for e in entries:
        if not e.skipped:
            results.append(_result(e, h, w, ref_median, is_baseline=e is ref, peak=peak.fp32_gmac_s))
        e.runner = None
    _release_free_heap()
    return results, skipped


def _absorb_one_time_costs(paths: list[Path], threads: int, runtimes: tuple[str, ...] | None) -> None:
    """Run one small input through the first artifact of each runtime, so that library start-up
    (thread pools, kernel caches) is not charged to whichever artifact happens to come first."""
    seen = set()
    for p in paths:
        for kind in runtimes_for(p, runtimes):
            if kind in seen or runtime_unavailable(kind):
                continue
            seen.add(kind)
            try:
                with open_model(p, threads=threads, runtime=kind) as m:
                    lo = m.min_hw
                    m(np.zeros((1, 3, max(lo[0], 16), max(lo[1], 16)), np.float32))
            except ParagonError:
                if kind != "tensorrt":
                    raise


def _prepare(e: _Entry, x: np.ndarray, *, threads: int, warmup: int) -> None:
    try:
        runner = open_model(e.path, threads=threads, runtime=e.kind)
    except ParagonError as err:
        # an engine for another machine, or a runtime not installed here, must not sink the whole table
        if e.kind == "tensorrt" or runtime_unavailable(e.kind):
            e.skipped = str(err)
            return
        raise
    with PeakRss() as mem:
        try:
            e.runner = runner.__enter__()
        except ParagonError as err:
            if e.kind != "tensorrt":  # an engine TensorRT refuses to load here is skipped like a foreign one
                raise
            e.skipped = str(err)
            return
        h, w = x.shape[2:]
        lo, hi = runner.min_hw, runner.max_hw
        if h < lo[0] or w < lo[1] or (hi and (h > hi[0] or w > hi[1])):
            e.skipped = f"{h}x{w} is outside the engine/model input range {lo}..{hi}"
            runner.__exit__(None, None, None)
            return
        for _ in range(max(1, warmup)):
            runner(x)
    e.peak_mib = mem.mib
    e.memory_method = mem.method
    e.precision = precision_of(runner)
    e.form = form_of(e.kind, runner)


def _result(e: _Entry, h: int, w: int, ref_median: float | None, *, is_baseline: bool, peak: float) -> BenchResult:
    t = np.asarray(e.times, dtype=np.float64)
    median = float(np.median(t))
    s = e.runner.scale
    gmacs = e.macs_per_pixel * h * w / median / 1e9 if e.macs_per_pixel else None
    return BenchResult(
        artifact=str(e.path), name=e.path.name, label=e.label, runtime=e.kind, form=e.form, precision=e.precision, scale=s,
        size=f"{h}x{w}", input_hw=[h, w], output_hw=[h * s, w * s], runs=len(t),
        median_ms=median * 1e3, p90_ms=float(np.percentile(t, 90)) * 1e3, mean_ms=float(t.mean()) * 1e3,
        min_ms=float(t.min()) * 1e3, max_ms=float(t.max()) * 1e3,
        throughput_img_s=1.0 / median, throughput_out_mpix_s=h * w * s * s / median / 1e6,
        peak_rss_mib=round(e.peak_mib, 1), memory_method=e.memory_method,
        baseline=is_baseline, speedup_vs_eager=(ref_median / median) if ref_median else None,
        macs_per_lr_pixel=round(e.macs_per_pixel) if e.macs_per_pixel else None,
        gmac_s=gmacs, peak_fraction=gmacs / peak if gmacs else None,
    )


def _host() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(cpu=cpu, cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                onnxruntime=onnxruntime.__version__, numpy=np.__version__, platform=platform.platform())
