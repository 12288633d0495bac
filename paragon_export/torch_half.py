"""torch_half: a float16 copy of a torch model that runs on this CPU. The torch fp16 reference of
`fp16` verification and of parity's "torch fp16" row (`runners.TorchCpuRunner`)."""

from __future__ import annotations

import copy
import warnings

import torch

# torch 2.13's oneDNN fp16 depthwise conv does not return (minutes at 32x32) for kernels of 15+ taps
# (anime's 1x15/15x1 band convs), measured on this project's CPUs; 14 taps take milliseconds.
ONEDNN_FP16_MAX_TAPS = 14


class _NativeConv(torch.nn.Module):
    """Runs one conv on torch's native kernels instead of oneDNN."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the flags context warns about TF32 on Intel GPUs
            with torch.backends.mkldnn.flags(enabled=False):
                return self.conv(x)


def torch_half_model(model: torch.nn.Module) -> torch.nn.Module:
    """A float16 copy of `model`; long-kernel convs avoid the oneDNN fp16 path that hangs."""
    half = copy.deepcopy(model).half().eval()
    for parent in list(half.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv2d) and max(child.kernel_size) > ONEDNN_FP16_MAX_TAPS:
                setattr(parent, name, _NativeConv(child))
    return half
