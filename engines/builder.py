"""The TensorRT part of a build: ONNX -> serialized plan, with a persistent timing cache and progress.

TensorRT 11 networks are always strongly typed: precision is whatever the ONNX says (fp32 ONNX ->
fp32 engine, fp16 ONNX -> fp16, Q/DQ ONNX -> int8) and the FP16/INT8 flags no longer exist.
TensorRT 10 builds weakly typed networks, so fp16 and Q/DQ models need their flag.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

from paragon_export.artifact import atomic_output
from paragon_export.errors import ParagonError

from .gpu import GpuInfo
from .identity import BuildOptions
from .onnx_info import OnnxInfo
from .profile import Profile
from .trt import strongly_typed_only

Echo = Callable[[str], None]


def default_timing_cache(gpu: GpuInfo, trt_version: str) -> Path:
    """One cache per GPU model and TensorRT version (a cache from another device is rejected anyway),
    in the user cache folder so every build on this machine reuses it."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "paragon-export" / "trt-timing"
    return root / f"{gpu.slug}-{gpu.sm}_trt{trt_version}.cache"


def _progress_monitor(trt, echo: Echo):
    """An IProgressMonitor printing the builder's top phases, with step counts at most once a second."""

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT may call from several threads
            self._phases: dict[str, tuple[int, int, float]] = {}  # name -> (depth, steps, start)
            self._last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = self._phases[parent_phase][0] + 1 if parent_phase in self._phases else 0
                self._phases[phase_name] = (depth, num_steps, time.monotonic())
                if depth <= 1:
                    echo(f"{'  ' * depth}{phase_name} ({num_steps} step{'s' if num_steps != 1 else ''})")

        def step_complete(self, phase_name, step):
            with self._lock:
                depth, steps, _ = self._phases.get(phase_name, (9, 0, 0.0))
                now = time.monotonic()
                if depth <= 1 and steps > 1 and now - self._last >= 1.0:
                    self._last = now
                    echo(f"{'  ' * depth}{phase_name}: {step + 1}/{steps}")
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self._lock:
                depth, _, start = self._phases.pop(phase_name, (9, 0, 0.0))
                if depth <= 1:
                    echo(f"{'  ' * depth}{phase_name} done in {time.monotonic() - start:.1f} s")

    return BuildProgress()


def _attach_timing_cache(config, path: Path, echo: Echo) -> bool:
    """Load `path` into the config; False (and a fresh cache) when it is from another GPU/TensorRT."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, False):
            if blob:
                echo(f"timing cache: reusing {path} ({len(blob) // 1024} KiB)")
            return True
    except (RuntimeError, TypeError, ValueError):
        pass
    echo(f"timing cache: {path} was written by another GPU or TensorRT version (or is damaged); "
         "starting a fresh one")
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def _save_timing_cache(config, path: Path, echo: Echo) -> None:
    data = config.get_timing_cache().serialize()
    with atomic_output(path, force=True, update=True) as tmp:  # the user's cache, read and grown in place
        with open(tmp, "wb") as f:
            f.write(data)
    echo(f"timing cache: saved {path}")


def compile_engine(trt, model: OnnxInfo, profile: Profile, options: BuildOptions, *, timing_cache: Path,
                   fallback_cache: Path, echo: Echo) -> bytes:
    """Parse the ONNX, configure the builder and return the serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TRT 11: always strongly typed; TRT 10: weakly typed + flags
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model.path)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise ParagonError(f"TensorRT {trt.__version__} cannot parse {model.path.name}: {errors}")

    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if options.hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if model.precision == "fp32":
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)  # TF32 convs round inputs to 10-bit mantissas: not what the fp32 ONNX does
    elif not strongly_typed_only(trt.__version__):
        config.set_flag(trt.BuilderFlag.FP16 if model.precision == "fp16" else trt.BuilderFlag.INT8)

    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(model.input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)

    cache_ok = _attach_timing_cache(config, timing_cache, echo)
    monitor = _progress_monitor(trt, echo)  # must outlive the build: keep the reference
    config.progress_monitor = monitor

    start = time.monotonic()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ParagonError(f"TensorRT failed to build an engine from {model.path.name} (its log above says why)")
    echo(f"built in {time.monotonic() - start:.1f} s")
    _save_timing_cache(config, timing_cache if cache_ok else fallback_cache, echo)
    return bytes(plan)


def deserialize(trt, data: bytes):
    """Load a plan with the TensorRT runtime; None-safe error when it does not fit this GPU/version."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ParagonError("TensorRT could not deserialize the engine (its log above says why)")
    return engine
