"""NCNN CPU runner for `.param`/`.bin` pairs (what `paragon-export ncnn` writes).

A pair is one artifact: `NAME.param` (graph) beside `NAME.bin` (weights), opened by either path.
`NAME.json` beside them (written by `ncnn_export`) records the scale, precision and blob names;
without it the precision comes from the file name and the scale is probed by the caller.

The ncnn wheel is optional (`pip install 'paragon-export[ncnn]'`) and imported only when a runner is
activated. Arithmetic is pinned to fp32 (no fp16/bf16 storage or arithmetic, no Vulkan): ncnn's
defaults would run an fp32 file through fp16 storage on CPUs that have it, and parity would measure
a different model than the file describes. An fp16 file therefore differs from the fp32 one only by
its fp16-rounded weights. NCNN has no batch axis: a batch is run image by image.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from .errors import ParagonError

INSTALL_HINT = "pip install 'paragon-export[ncnn]'"
# The names every other runner uses (runners.INPUT_NAME / OUTPUT_NAME), so feeds are interchangeable.
FEED_INPUT, FEED_OUTPUT = "input", "output"
SIDECAR_FORMAT = "paragon-export/ncnn"


def ncnn_version() -> str | None:
    try:
        import ncnn
    except ImportError:
        return None
    return getattr(ncnn, "__version__", "?")


def pair(path: Path | str) -> tuple[Path, Path]:
    """(param, bin) for either file of a pair; both must exist."""
    path = Path(path)
    param, weights = path.with_suffix(".param"), path.with_suffix(".bin")
    for p in (param, weights):
        if not p.is_file():
            raise ParagonError(f"{path}: an NCNN model is a .param with its .bin beside it; {p.name} is missing")
    return param, weights


def read_sidecar(param: Path) -> dict:
    """The metadata json `ncnn_export` writes beside the pair ({} when absent or not ours)."""
    try:
        data = json.loads(param.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT else {}


def ncnn_info(path: Path | str) -> dict:
    """What `runners.open_runner` needs to describe the pair: param path, precision (+ where it came
    from), scale (None: not recorded) and the metadata."""
    param, _ = pair(path)
    meta = read_sidecar(param)
    if meta.get("precision") in ("fp32", "fp16"):
        precision, source = meta["precision"], f"metadata {param.with_suffix('.json').name}"
    else:
        token = next((t for t in ("fp16", "fp32") if t in param.name.lower()), None)
        # unlabelled: fp16 limits, the strictest an fp16-stored file can be expected to meet
        precision, source = (token, f"file name ({token})") if token else ("fp16", "not recorded; fp16 limits used")
    scale = meta.get("scale")
    return {"path": param, "precision": precision, "precision_source": source,
            "scale": int(scale) if isinstance(scale, int) or str(scale).isdigit() else None,
            "meta": {k: str(v) for k, v in meta.items() if not isinstance(v, (dict, list))}}


class NcnnRunner(BaseRunner):
    """Loads the pair into an ncnn.Net at activation; NCHW float32 in, NCHW float32 out."""

    def __init__(self, path: Path | str, *, name: str | None = None, threads: int | None = None):
        super().__init__(name=name, prefix="ncnn-runner")
        self.param, self.weights = pair(path)
        self.threads = threads
        self.net = None
        self.blobs = ("in0", "out0")

    def activate_impl(self):
        try:
            import ncnn
        except ImportError:
            raise ParagonError(f"ncnn is not installed ({INSTALL_HINT})") from None
        net = ncnn.Net()
        opt = net.opt
        opt.use_vulkan_compute = False
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                     "use_bf16_packed"):
            if hasattr(opt, flag):
                setattr(opt, flag, False)
        if self.threads:
            opt.num_threads = int(self.threads)
        # ncnn returns a non-zero status (and prints to stderr) instead of raising
        if net.load_param(str(self.param)) != 0:
            raise ParagonError(f"{self.param}: ncnn cannot read this .param file")
        if net.load_model(str(self.weights)) != 0:
            raise ParagonError(f"{self.weights}: ncnn cannot read these weights (does the .bin match the .param?)")
        inputs, outputs = list(net.input_names()), list(net.output_names())
        if len(inputs) != 1 or len(outputs) != 1:
            raise ParagonError(f"{self.param}: expected one input and one output blob, found {inputs} and {outputs}")
        self.net, self.blobs = net, (inputs[0], outputs[0])

    def get_input_metadata_impl(self):
        # NCNN is shape-free: any batch (run image by image) and any H/W.
        return TensorMetadata().add(FEED_INPUT, dtype=DataType.FLOAT32, shape=("batch", 3, "height", "width"))

    def infer_impl(self, feed_dict):
        import ncnn

        x = np.asarray(next(iter(feed_dict.values())), np.float32)
        outs = []
        start = time.perf_counter()
        for image in x:
            image = np.ascontiguousarray(image)  # ncnn.Mat wraps this memory: it must outlive the run
            with self.net.create_extractor() as ex:
                ex.input(self.blobs[0], ncnn.Mat(image))
                status, out = ex.extract(self.blobs[1])
                if status != 0:
                    raise ParagonError(f"{self.param}: ncnn failed to run a {list(image.shape)} input (status {status})")
                # copied while the extractor (which owns the output's memory) is alive
                outs.append(np.array(out, dtype=np.float32, copy=True))
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(FEED_OUTPUT, np.stack(outs))])

    def deactivate_impl(self):
        if self.net is not None:
            self.net.clear()
        self.net = None
