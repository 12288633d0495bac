"""Polygraphy runners for every kind of artifact parity compares.

Torch runs through a small PytRunner subclass (the stock one moves inputs to CUDA, which a CPU
torch build does not have); ONNX through Polygraphy's OnnxrtRunner on the CPU provider; TensorRT
engines through Polygraphy's TrtRunner, only where tensorrt imports and a CUDA GPU is present.
"""

from __future__ import annotations

import copy
import ctypes
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.backend.pyt import PytRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from .errors import ParagonError

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
            from .fp16 import torch_half_model  # avoids oneDNN's fp16 long-kernel convs, which hang

            # oneDNN's fp16 convs are ~20x faster channels-last on CPU
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


def onnx_runner(model: Path | str | bytes, *, name: str, threads: int | None = None,
                native_int8: bool = False) -> OnnxrtRunner:
    """ORT CPU; Q/DQ graphs run their reference semantics unless `native_int8` (`onnx_graph.ort_session`).
    A file ORT cannot load fails at activation with one ParagonError line."""
    from .onnx_graph import ort_session

    src = model if isinstance(model, bytes) else str(model)
    what = "the model" if isinstance(model, bytes) else str(model)

    def session():
        try:
            return ort_session(src, threads=threads, native_int8=native_int8)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise ParagonError(f"{what}: onnxruntime cannot load it: {str(e).splitlines()[0]}") from None

    return OnnxrtRunner(session, name=name)


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
    from .engines.build import EngineMismatch, current_target, load_engine
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
