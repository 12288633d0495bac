"""Exponential moving average of the generator.

Float parameters are averaged; every buffer (tracked kernels, and the bool `tracked_initialized`
flags the original's EMA library skipped) is copied, so the EMA model fuses with real kernels.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm-up of the decay (as in common EMA implementations) so early EMA weights are not
        # dominated by the random init; `step` is 1-based.
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
