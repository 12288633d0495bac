"""Seeded stand-in models for tests and benchmarks, where no trained weights are wanted."""

from __future__ import annotations

import torch

from paragon_export.arch import ParagonSR2, build


def seeded_model(variant: str = "paragonsr2_nano", scale: int = 2, upsampler: str = "mks2021",
                 seed: int = 0) -> ParagonSR2:
    """Random weights, LayerScale gammas 0.05-0.3 and initialised tracked kernels (as the golden
    traiNNer-redux files), so every block contributes: a freshly built model is nearly the identity
    path, which would hide fusion and quantization errors. Deterministic for a given seed."""
    torch.manual_seed(seed)  # conv initialisers draw from the global generator
    g = torch.Generator().manual_seed(seed)
    m = build(variant, scale=scale, upsampler=upsampler)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.25 * torch.rand(p.shape, generator=g))
        for _, t in m.transformers():
            t.tracked_kernel.copy_(t.identity_kernel + 0.1 * torch.randn(t.tracked_kernel.shape, generator=g))
            t.tracked_initialized.fill_(True)
    return m.eval()
