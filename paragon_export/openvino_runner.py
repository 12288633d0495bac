"""OpenVINO CPU runner for ONNX artifacts (fp32, fp16 and Q/DQ int8 files are read directly).

OpenVINO is optional (`pip install 'paragon-export[openvino]'`) and imported only when a runner is
activated. Inference precision is pinned to f32: on CPUs with bf16 units OpenVINO would otherwise
run an fp32 file in bf16, and parity would be measuring a different model than the file describes.
Q/DQ int8 graphs still run on OpenVINO's own integer kernels (its low-precision transformations),
whose numerics depend on the CPU's ISA; that is what parity reports for them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from .errors import ParagonError


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version() if hasattr(openvino, "get_version") else getattr(openvino, "__version__", "?")


class OpenVinoRunner(BaseRunner):
    """Compiles the ONNX file for OpenVINO's CPU plugin at activation; numpy in, numpy out."""

    def __init__(self, path: Path | str, *, name: str | None = None, threads: int | None = None):
        super().__init__(name=name, prefix="openvino-runner")
        self.path = Path(path)
        self.threads = threads
        self.compiled = self.request = None

    def activate_impl(self):
        try:
            import openvino as ov
        except ImportError:
            raise ParagonError("OpenVINO is not installed (pip install 'paragon-export[openvino]')") from None
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line C++ traces
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParagonError(f"{self.path}: OpenVINO cannot compile it: {first[:300]}") from None
        self.request = self.compiled.create_infer_request()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for port in self.compiled.inputs:
            dims = [d.get_length() if d.is_static else f"dim{i}" for i, d in enumerate(port.get_partial_shape())]
            dtype = DataType.from_dtype(np.dtype(port.get_element_type().to_dtype()))
            meta.add(port.get_any_name(), dtype=dtype, shape=dims)
        return meta

    def infer_impl(self, feed_dict):
        feed = {k: np.ascontiguousarray(v) for k, v in feed_dict.items()}
        start = time.perf_counter()
        result = self.request.infer(feed)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((port.get_any_name(), np.asarray(result[port]).copy()) for port in self.compiled.outputs)

    def deactivate_impl(self):
        self.compiled = self.request = None
