"""Memory a run at a user-given size will need, estimated before anything is allocated.

`bench --sizes 5000x5000`, `parity --sizes` or an untiled `upscale` of a huge image would otherwise
grow until the kernel's OOM killer ends the process (and, on a shared machine, other work with it).
The estimate comes from the model itself: the most activation values one operator reads and writes
at once per LR pixel (ONNX shape inference on a small probe input, or torch forward hooks for a
checkpoint), times a margin for what runtimes keep alive beside it (skip connections, allocator
arenas, copies), plus the weights and the input/output arrays. It is compared with the memory the
kernel reports available (MemAvailable) and refused in one line, naming the size and the estimate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ParagonError

PROBE_HW = (16, 16)
VALUE_BYTES = 4  # float32: the CPU runtimes compute (and hold I/O) in fp32 for every file we make
# What a runtime holds beside the largest operator's input and output (residual and skip tensors,
# arena rounding, the layout copies oneDNN makes); checked against measured peaks in tests/test_memory.py.
MARGIN = 3.0
RUNTIME_OVERHEAD = 256 << 20  # library code and buffers a runtime allocates whatever the size


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _onnx_probe(path: Path) -> tuple[int, int]:
    """(most activation values one node reads and writes, output height) at PROBE_HW."""
    import onnx

    from .onnx_graph import tensor_shapes

    model = onnx.load(str(path))
    shapes = tensor_shapes(model, PROBE_HW)
    weights = {i.name for i in model.graph.initializer}
    worst = 0
    for n in model.graph.node:
        names = [t for t in (*n.input, *n.output) if t and t not in weights]
        worst = max(worst, sum(int(np.prod(shapes[t])) for t in names if shapes.get(t)))
    out = shapes.get(model.graph.output[0].name) or [0, 0, 0]
    return worst, int(out[2]) if len(out) == 4 else 0


def _torch_probe(path: Path) -> tuple[int, int]:
    """(most activation values one module reads and writes, output height) at PROBE_HW."""
    import torch

    from .checkpoint import load_model

    model = load_model(path).model.eval()
    worst = [0]

    def hook(_m, inputs, output):
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        worst[0] = max(worst[0], sum(t.numel() for t in tensors))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *PROBE_HW))
    finally:
        for h in handles:
            h.remove()
    return worst[0], int(out.shape[2])


@dataclass(frozen=True)
class Footprint:
    """What one inference of an artifact holds, per LR input pixel, and its file size."""

    values_per_pixel: float  # the most activation values one operator reads and writes at once
    scale: int
    file_bytes: int

    def bytes_at(self, hw: tuple[int, int]) -> int:
        """Estimated peak memory of one 1x3xHxW inference at LR size `hw`."""
        px = hw[0] * hw[1]
        io = (3 + 3 * self.scale ** 2) * px * VALUE_BYTES * 2  # the caller's arrays and the runtime's copies
        return int(2 * self.file_bytes + RUNTIME_OVERHEAD + (MARGIN * self.values_per_pixel * VALUE_BYTES) * px + io)


def footprint(path: Path | str) -> Footprint | None:
    """The artifact's Footprint from one small probe; None for kinds with no graph to read here
    (TensorRT engines, NCNN) or files that cannot be read (their own command says why)."""
    from .runners import artifact_kind

    path = Path(path)
    try:
        kind = artifact_kind(path)
        worst, out_h = _onnx_probe(path) if kind == "onnx" else _torch_probe(path) if kind == "checkpoint" else (0, 0)
        size = path.stat().st_size
    except Exception:  # noqa: BLE001 - a file that cannot be probed: its own command says why, in one line
        return None
    if not worst or not out_h:
        return None
    return Footprint(worst / (PROBE_HW[0] * PROBE_HW[1]), max(1, out_h // PROBE_HW[0]), size)


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_fits(what: str, needed: int | None, available: int | None = None) -> None:
    """Refuse in one line when `needed` bytes exceed what the machine has available now."""
    available = available_bytes() if available is None else available
    if needed is None or available is None or needed <= available:
        return
    raise ParagonError(f"{what} needs an estimated {gib(needed)} of memory, more than the {gib(available)} "
                       "available; use a smaller size (or tiles)")


def upscale_bytes(fp: Footprint, hw: tuple[int, int], tile: int) -> int:
    """One image through the tiler: the largest tile's inference plus the HR accumulators
    (colour, blend weight and alpha planes, float32, and the final copy)."""
    h, w = hw
    tile_hw = (min(tile, h), min(tile, w)) if tile else (h, w)
    return fp.bytes_at(tile_hw) + h * w * fp.scale ** 2 * 5 * VALUE_BYTES * 2


def refuse_what_cannot_fit(paths, sizes, command: str) -> None:
    """Before any runner is built: every artifact at every LR size must fit in available memory."""
    available = available_bytes()
    if available is None:
        return
    largest = max(sizes, key=lambda hw: hw[0] * hw[1])
    for p in paths:
        fp = footprint(p)
        if fp is not None:
            check_fits(f"{command} of {Path(p).name} at {largest[0]}x{largest[1]}", fp.bytes_at(largest), available)
