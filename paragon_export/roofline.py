"""How close an artifact runs to this CPU's limit: multiply-accumulates per LR pixel (counted from the
ONNX graph, or from the PyTorch model's conv calls), and a measured fp32 peak to divide by.

The peak is a probe, not a datasheet figure: an fp32 1024^3 MatMul in ONNX Runtime (MLAS SGEMM, the
kernels our convs run on) at the bench's thread count, best of a few runs (a peak is the fastest
the core managed, so load on a shared machine only makes it an underestimate, never an overestimate
of what was reachable). int8 rows are divided by the same fp32 peak: ONNX Runtime runs a TensorRT-
placement Q/DQ graph's convs in float (no Q/DQ on conv outputs, so no QLinearConv).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cpu import isa

PROBE_N = 1024
PEAK_NOTE = (f"peak: fp32 {PROBE_N}^3 MatMul on ONNX Runtime CPU (MLAS SGEMM) at the bench thread count, "
             "best of 5 runs; every row (int8 too) is divided by this fp32 peak")


@functools.lru_cache(maxsize=8)
def fp32_peak_gmacs(threads: int, n: int = PROBE_N, repeats: int = 5) -> float:
    """Best-of-`repeats` GMAC/s of an n x n x n fp32 MatMul on ORT CPU with `threads` threads."""
    import onnx
    from onnx import TensorProto, helper

    from .onnx_graph import ort_session

    b = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort_session(model, threads=threads)
    a = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    sess.run(None, {"a": a})  # warm-up: packing buffers, thread pool
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"a": a})
        best = min(best, time.perf_counter() - t)
    return n**3 / best / 1e9


@dataclass(frozen=True)
class Peak:
    """This CPU's measured fp32 peak at a thread count; the fields are the bench report's "peak" object."""

    fp32_gmac_s: float
    threads: int
    isa: str
    method: str = PEAK_NOTE


def peak_info(threads: int) -> Peak:
    return Peak(round(fp32_peak_gmacs(threads), 2), threads, isa())


def onnx_macs_per_pixel(path: Path | str, hw: tuple[int, int]) -> float | None:
    import onnx

    from .onnx_graph import macs_per_pixel

    return macs_per_pixel(onnx.load(str(path)), hw)


def torch_macs_per_pixel(path: Path | str, hw: tuple[int, int]) -> float | None:
    """Conv MACs of the checkpoint's eval forward (static kernels) per LR pixel, counted by torch's
    FlopCounterMode over one real inference at `hw` (meta tensors cannot run the tracked-kernel
    check, and one inference is small next to a bench's warm-up and timed runs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .checkpoint import load_model

    model = load_model(path).model.eval()
    model.set_dynamic_inference(False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *hw))
    flops = counter.get_total_flops()
    return flops / 2 / (hw[0] * hw[1]) if flops else None  # FlopCounter counts 2 FLOPs per MAC


def artifact_macs_per_pixel(path: Path | str, hw: tuple[int, int]) -> float | None:
    """MACs per LR pixel of one inference at `hw`; NCNN: as counted on its ONNX at export; None for engines."""
    from .runners import artifact_kind

    kind = artifact_kind(path)
    if kind == "onnx":
        return onnx_macs_per_pixel(path, hw)
    if kind == "checkpoint":
        return torch_macs_per_pixel(path, hw)
    if kind == "ncnn":
        from .ncnn_runner import pair, read_sidecar

        return read_sidecar(pair(path)[0]).get("macs_per_lr_pixel")
    return None
