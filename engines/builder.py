"""The TensorRT part of a build: ONNX -> serialized plan, with a persistent timing cache and progress.

Every network is built strongly typed (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, in TensorRT 10
and 11): the engine runs exactly the ONNX's types (fp32 ONNX -> fp32 engine, fp16 ONNX -> fp16, Q/DQ
ONNX -> int8 with its remainder in the ONNX's float type). A weakly typed TensorRT 10 build with
`BuilderFlag.FP16` may run the nodes our fp16 pass deliberately kept in fp32 (overflow guards) in
fp16; those flags are deprecated since 10.12 and gone in 11, so no precision flag is ever set.
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

Progress = Callable[[str], None]


def default_timing_cache(gpu: GpuInfo, trt_version: str) -> Path:
    """One cache per GPU model and TensorRT version (a cache from another device is rejected anyway),
    in the user cache folder so every build on this machine reuses it."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "paragon-export" / "trt-timing"
    return root / f"{gpu.slug}-{gpu.sm}_trt{trt_version}.cache"


def _progress_monitor(trt, progress: Progress):
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
                    progress(f"{'  ' * depth}{phase_name} ({num_steps} step{'s' if num_steps != 1 else ''})")

        def step_complete(self, phase_name, step):
            with self._lock:
                depth, steps, _ = self._phases.get(phase_name, (9, 0, 0.0))
                now = time.monotonic()
                if depth <= 1 and steps > 1 and now - self._last >= 1.0:
                    self._last = now
                    progress(f"{'  ' * depth}{phase_name}: {step + 1}/{steps}")
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self._lock:
                depth, _, start = self._phases.pop(phase_name, (9, 0, 0.0))
                if depth <= 1:
                    progress(f"{'  ' * depth}{phase_name} done in {time.monotonic() - start:.1f} s")

    return BuildProgress()


def _try_timing_cache(config, path: Path, progress: Progress) -> bool:
    """Attach the cache at `path` (a missing file is an empty, valid cache); False when TensorRT rejects it."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, False):
            if blob:
                progress(f"timing cache: reusing {path} ({len(blob) // 1024} KiB)")
            return True
    except (RuntimeError, TypeError, ValueError):
        pass
    progress(f"timing cache: {path} was written by another GPU or TensorRT version (or is damaged); not using it")
    return False


def _attach_timing_cache(config, path: Path, fallback: Path, progress: Progress) -> Path:
    """Attach `path`, else the default per-GPU cache `fallback`, else a fresh one; returns where to save.

    A rejected `--timing-cache` must not cost the good default cache: the default is loaded (and so
    extended, not replaced) when it is accepted; only a rejected default is started afresh.
    """
    if _try_timing_cache(config, path, progress):
        return path
    if fallback != path and _try_timing_cache(config, fallback, progress):
        return fallback
    progress(f"timing cache: starting a fresh one at {fallback}")
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return fallback


def _save_timing_cache(config, path: Path, progress: Progress) -> None:
    data = config.get_timing_cache().serialize()
    with atomic_output(path, force=True, update=True) as tmp:  # the user's cache, read and grown in place
        with open(tmp, "wb") as f:
            f.write(data)
    progress(f"timing cache: saved {path}")


def _option_flags(trt, options: BuildOptions) -> list:
    flags = []
    if options.refittable:
        flags.append(trt.BuilderFlag.REFIT)
    if options.strip_weights:
        # The stripped plan is refitted from the same ONNX at load: REFIT_IDENTICAL lets TensorRT optimise as
        # if the weights were constants (a plain REFIT plan may be slower).
        flags += [trt.BuilderFlag.STRIP_PLAN] + ([] if options.refittable else [trt.BuilderFlag.REFIT_IDENTICAL])
    if options.version_compatible:
        flags.append(trt.BuilderFlag.VERSION_COMPATIBLE)  # the lean runtime is embedded in the plan
    return flags


def compile_engine(trt, model: OnnxInfo, profile: Profile, options: BuildOptions, *, timing_cache: Path,
                   fallback_cache: Path, progress: Progress) -> bytes:
    """Parse the ONNX, configure the builder and return the serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # The flag is a bit index (1 in TensorRT 10, 0 in 11), not a mask.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model.path)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise ParagonError(f"TensorRT {trt.__version__} cannot parse {model.path.name}: {errors}")

    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if options.hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    # TF32 (on by default) is allowed in strongly typed networks and rounds fp32 conv inputs to 10-bit
    # mantissas: not what the ONNX's fp32 ops (an fp32 model, or an fp16/int8 model's fp32 remainder) do.
    config.clear_flag(trt.BuilderFlag.TF32)
    for flag in _option_flags(trt, options):
        config.set_flag(flag)

    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(model.input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)

    save_cache_to = _attach_timing_cache(config, timing_cache, fallback_cache, progress)
    monitor = _progress_monitor(trt, progress)  # must outlive the build: keep the reference
    config.progress_monitor = monitor

    start = time.monotonic()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ParagonError(f"TensorRT failed to build an engine from {model.path.name} (its log above says why)")
    progress(f"built in {time.monotonic() - start:.1f} s")
    _save_timing_cache(config, save_cache_to, progress)
    return bytes(plan)


def deserialize(trt, data: bytes, options: BuildOptions = BuildOptions(), onnx_path: Path | None = None):
    """Load a plan with the TensorRT runtime; None-safe error when it does not fit this GPU/version.

    A version-compatible plan carries its lean runtime (host code the runtime must be allowed to run);
    a weight-stripped plan gets its weights back from the ONNX it was built from."""
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if options.version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ParagonError("TensorRT could not deserialize the engine (its log above says why)")
    if options.strip_weights:
        refit_from_onnx(trt, engine, onnx_path, logger)
    return engine


def refit_from_onnx(trt, engine, onnx_path: Path | None, logger) -> None:
    """Give a refittable (or weight-stripped) engine the weights of an ONNX with the same graph."""
    if onnx_path is None or not Path(onnx_path).is_file():
        raise ParagonError(f"the engine's weights come from its ONNX, {onnx_path}, which is gone")
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise ParagonError(f"TensorRT cannot refit the engine from {Path(onnx_path).name}: {errors}")
    if not refitter.refit_cuda_engine():
        raise ParagonError(f"TensorRT could not refit the engine from {Path(onnx_path).name} (its log says why)")
