"""One way to open and run an artifact: `open_runner(path, runtime)` returns a Polygraphy runner
(activate / infer(feed) -> dict / deactivate) carrying `info` (kind, runtime, precision, scale), and
`SUFFIXES` is the one table of what a file name means. parity, bench and upscale all open through it.

Torch runs through a small PytRunner subclass (the stock one moves inputs to CUDA, which a CPU
torch build does not have); ONNX through Polygraphy's OnnxrtRunner on the CPU provider or through
OpenVINO (`runtime="openvino"`); TensorRT engines through Polygraphy's TrtRunner, only where
tensorrt imports and a CUDA GPU is present; NCNN .param/.bin through the ncnn wheel. Optional
runtimes are imported only when a runner for them is opened.
"""

from __future__ import annotations

import copy
import ctypes
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.pyt import PytRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from .errors import ParagonError, metadata_int, require_file
from .onnx_graph import onnx_runner

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _lr_metadata() -> TensorMetadata:
    # Batch, height and width are named (dynamic) dims so every LR size passes Polygraphy's input check.
    return TensorMetadata().add(INPUT_NAME, dtype=DataType.FLOAT32, shape=("batch", 3, "height", "width"))


class TorchCpuRunner(PytRunner):
    """Runs a ParagonSR2 module on the CPU in fp32 or fp16 arithmetic; fp32 in, fp32 out."""

    def __init__(self, model: torch.nn.Module, *, name: str, dtype: torch.dtype = torch.float32):
        super().__init__(model, _lr_metadata(), [OUTPUT_NAME], name=name)
        self.dtype = dtype

    def activate_impl(self):
        # A copy: casting to half must not change the caller's fp32 model.
        if self.dtype == torch.float16:
            from .torch_half import torch_half_model  # avoids oneDNN's fp16 long-kernel convs, which hang

            # oneDNN's fp16 convs are far faster channels-last on CPU (README: measured figures)
            self.model = torch_half_model(self._model).to(memory_format=torch.channels_last)
        else:
            self.model = copy.deepcopy(self._model).eval()

    def infer_impl(self, feed_dict):
        x = torch.from_numpy(np.ascontiguousarray(next(iter(feed_dict.values())))).to(self.dtype)
        if self.dtype == torch.float16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            start = time.perf_counter()
            y = self.model(x)
            self.inference_time = time.perf_counter() - start
        return OrderedDict([(OUTPUT_NAME, y.float().numpy())])


def _cuda_device_count() -> int:
    """Ask the CUDA driver directly, so a CPU-only torch build does not hide a GPU."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def tensorrt_unavailable() -> str | None:
    """None when engines can run here, else the reason they cannot (for the report)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'paragon-export[trt]')"
    except Exception as e:  # a broken install (missing CUDA libraries) raises OSError/RuntimeError
        return f"TensorRT failed to import: {str(e).splitlines()[0]}"
    if _cuda_device_count() == 0:
        return "no CUDA GPU (or driver) found; TensorRT engines need one"
    return None


class EngineNotRunnable(ParagonError):
    """The engine cannot run here (another GPU/TensorRT, or TensorRT refused it); the message says how to
    rebuild it. `bench` and `parity` skip such an engine; `upscale` stops with this one line."""


def _refuse_foreign_engine(path: Path) -> dict | None:
    """Consult the engine folder's manifest: a plan built for another GPU or TensorRT version would only
    fail inside TensorRT with a traceback, so it is refused first with the rebuild command. Returns the
    engine's manifest entry (None when it has none)."""
    from .engines.load import EngineMismatch, current_target, load_engine
    from .engines.manifest import entry_for_file

    try:
        known = entry_for_file(path.parent, path.name)
    except ParagonError:
        known = None  # an unreadable manifest: TensorRT itself decides below
    if known is None:
        return None  # e.g. a trtexec-built engine: nothing recorded to compare with
    try:
        return load_engine(path, target=current_target())[1]
    except EngineMismatch as e:
        raise EngineNotRunnable(str(e)) from None


def _guarded_trt_runner(path: Path, name: str, entry: dict | None):
    """Polygraphy's TrtRunner whose load failure (a plan TensorRT rejects) is one ParagonError line.
    The plan is loaded by `engines.builder.deserialize` with the options its manifest entry records."""
    from polygraphy.backend.trt import TrtRunner

    from .engines.builder import deserialize
    from .engines.identity import BuildOptions, EngineKey
    from .engines.trt import require_tensorrt

    options = EngineKey.from_dict(entry["key"]).options if entry else BuildOptions()
    onnx = Path(entry["onnx"]["path"]) if entry else None

    class GuardedTrtRunner(TrtRunner):
        def activate_impl(self):
            try:
                super().activate_impl()
            except Exception as e:  # PolygraphyException, or TensorRT's RuntimeError
                last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                raise EngineNotRunnable(f"TensorRT cannot load {path.name} ({last}): rebuild it for this GPU "
                                        f"with `paragon-export engine {path} --rebuild`") from None

    return GuardedTrtRunner(lambda: deserialize(require_tensorrt(), path.read_bytes(), options, onnx), name=name)


def trt_runner(path: Path | str, *, name: str):
    reason = tensorrt_unavailable()
    if reason:
        raise ParagonError(reason)
    path = Path(path)
    return _guarded_trt_runner(path, name, _refuse_foreign_engine(path))


# ----------------------------------------------------------------------------------------------
# The one suffix table and the one way to open an artifact.

SUFFIXES = {
    ".safetensors": "checkpoint", ".pth": "checkpoint", ".pt": "checkpoint", ".ckpt": "checkpoint",
    ".bin": "checkpoint",  # an NCNN weight file when a .param lies beside it (see artifact_kind)
    ".onnx": "onnx",
    ".engine": "engine", ".plan": "engine", ".trt": "engine",
    ".param": "ncnn",
}
# The runtimes each kind of artifact runs on; the first is its default.
RUNTIMES = {"checkpoint": ("torch",), "onnx": ("onnxruntime", "openvino"), "engine": ("tensorrt",),
            "ncnn": ("ncnn",)}
ALL_RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt", "ncnn")
INSTALL_HINTS = {"openvino": "pip install 'paragon-export[openvino]'", "ncnn": "pip install 'paragon-export[ncnn]'",
                 "tensorrt": "pip install 'paragon-export[trt]'"}


class RuntimeUnavailable(ParagonError):
    """The runtime cannot run here (package missing, no GPU): callers that list runtimes skip it."""


@dataclass
class RunnerInfo:
    """What an opened artifact is: parity labels rows with it, bench and upscale size inputs with it."""

    path: Path
    kind: str  # checkpoint | onnx | engine | ncnn
    runtime: str  # torch | onnxruntime | openvino | tensorrt | ncnn
    precision: str  # fp32 | fp16 | int8 | unknown
    precision_source: str
    scale: int | None = None  # None: not recorded; the caller probes it
    meta: dict = field(default_factory=dict)


def artifact_kind(path: Path | str) -> str:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bin" and path.with_suffix(".param").is_file():
        return "ncnn"
    if suffix not in SUFFIXES:
        if path.is_dir():
            raise ParagonError(f"artifact {path} is a folder, not a file")
        groups = {}
        for s, k in SUFFIXES.items():
            groups.setdefault(k, []).append(s)
        listing = "; ".join(f"{k} {'/'.join(v)}" for k, v in groups.items())
        raise ParagonError(f"{path}: unknown artifact type {path.suffix!r} (expected {listing})")
    return SUFFIXES[suffix]


def resolve_runtime(path: Path | str, runtime: str | None = None) -> str:
    """The runtime that runs `path`: its default, or `runtime` when that runtime can run this kind."""
    kind = artifact_kind(path)
    if runtime is None:
        return RUNTIMES[kind][0]
    if runtime not in ALL_RUNTIMES:
        raise ParagonError(f"unknown runtime {runtime!r} (one of {', '.join(ALL_RUNTIMES)})")
    if runtime not in RUNTIMES[kind]:
        raise ParagonError(f"{Path(path).name}: a {kind} artifact runs on {' or '.join(RUNTIMES[kind])}, not {runtime}")
    return runtime


def runtime_unavailable(runtime: str) -> str | None:
    """None when `runtime` can run here, else a one-line reason with the install hint."""
    if runtime == "tensorrt":
        return tensorrt_unavailable()
    module = {"openvino": "openvino", "ncnn": "ncnn"}.get(runtime)
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{runtime} is not installed ({INSTALL_HINTS[runtime]})"
    return None


def open_runner(path: Path | str, runtime: str | None = None, *, threads: int | None = None,
                scale: int | None = None, native_int8: bool = False, name: str | None = None):
    """A Polygraphy runner for the artifact at `path` on `runtime` (default: the kind's first), not yet
    activated, with `.info` (RunnerInfo). `scale` is needed only for checkpoints that do not record it
    (traiNNer-redux); `native_int8` selects ONNX Runtime's fused integer kernels for Q/DQ graphs.
    Raises ParagonError for a bad file, RuntimeUnavailable when the runtime cannot run here."""
    path = Path(path)
    rt = resolve_runtime(path, runtime)
    require_file(path, "artifact")
    reason = runtime_unavailable(rt)
    if reason:
        raise RuntimeUnavailable(reason)
    name = name or path.name
    kind = artifact_kind(path)
    if kind == "checkpoint":
        return _torch_artifact(path, name, threads=threads, scale=scale)
    if kind == "onnx":
        model = _load_onnx(path)
        precision, source = onnx_precision(model)
        props = {p.key: p.value for p in model.metadata_props}
        info = RunnerInfo(path, kind, rt, precision, source, metadata_int(props.get("scale"), "scale", path), props)
        if rt == "openvino":
            from .openvino_runner import OpenVinoRunner

            runner = OpenVinoRunner(path, name=name, threads=threads)
        else:
            runner = onnx_runner(path, name=name, threads=threads, native_int8=native_int8)
    elif kind == "engine":
        precision, source = engine_precision(path)
        info = RunnerInfo(path, kind, rt, precision, source)
        runner = trt_runner(path, name=name)
    else:
        from .ncnn_runner import NcnnRunner, ncnn_info

        found = ncnn_info(path)  # a .param or its .bin: the pair is opened through the .param
        info = RunnerInfo(found["path"], kind, rt, found["precision"], found["precision_source"], found["scale"],
                          found["meta"])
        runner = NcnnRunner(info.path, name=name, threads=threads)
    runner.info = info
    return runner


def _load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ParagonError(f"{path}: not a readable ONNX file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _torch_artifact(path: Path, name: str, *, threads: int | None, scale: int | None):
    from .checkpoint import load_model

    loaded = load_model(path, scale=scale)
    # Eval mode with the tracked static kernels: the path the fused/exported models reproduce.
    loaded.model.eval().set_dynamic_inference(False)
    if threads:
        torch.set_num_threads(threads)
    runner = TorchCpuRunner(loaded.model, name=name)
    runner.info = RunnerInfo(path, "checkpoint", "torch", "fp32", "checkpoint (fp32 torch)", loaded.scale,
                             {k: str(v) for k, v in loaded.meta.items()})
    runner.loaded = loaded
    return runner


def onnx_precision(model) -> tuple[str, str]:
    """(precision, where it came from): the "precision" metadata_props entry when the graph agrees
    with it; on a conflict the graph wins (a Q/DQ graph labelled fp32 is still int8)."""
    from .onnx_graph import graph_precision, normalise_precision

    graph = graph_precision(model)
    evidence = {"int8": "Q/DQ nodes", "fp16": "fp16 initializers", "fp32": "fp32 initializers"}[graph]
    props = {p.key: p.value for p in model.metadata_props}
    meta = normalise_precision(props["precision"]) if "precision" in props else None
    if meta == graph:
        return graph, f"metadata precision={props['precision']}"
    if meta is not None:
        return graph, f"graph ({evidence}); metadata says precision={props['precision']}"
    return graph, f"graph ({evidence})"


def engine_precision(path: Path) -> tuple[str, str]:
    """From the engine folder's manifest, else the file name, else fp16 (the strictest limits that
    an unlabelled engine can be expected to meet)."""
    try:
        from paragon_export.engines.manifest import entry_for_file

        found = entry_for_file(path.parent, path.name)
    except (ImportError, ParagonError, OSError, ValueError):
        found = None
    precision = found[1].get("key", {}).get("precision") if found else None  # engines/identity.py's key
    if precision:
        return precision, "engine manifest"
    for token, prec in (("int8", "int8"), ("qat", "int8"), ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32")):
        if token in path.name.lower():
            return prec, f"file name ({token})"
    return "fp16", "not recorded; fp16 limits used"
