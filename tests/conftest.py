"""Shared fixtures: small seeded ParagonSR2 models whose every block contributes to the output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from arch import build
from paragon_export.checkpoint import save_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Copied from ../shared/compat so that a clean checkout tests without the shared folder.
COMPAT = Path(__file__).resolve().parent / "golden"


def make_model(variant: str = "paragonsr2_nano", scale: int = 2, upsampler: str = "mks2021", seed: int = 0,
               fused: bool = False):
    """Seeded random weights, LayerScale gammas in 0.05-0.3 and initialised tracked kernels (as the
    golden files), so that fusion and quantization are exercised on every block."""
    g = torch.Generator().manual_seed(seed)
    m = build(variant, scale=scale, upsampler=upsampler)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.25 * torch.rand(p.shape, generator=g))
        for name, t in m.transformers():
            t.tracked_kernel.copy_(t.identity_kernel + 0.1 * torch.randn(t.tracked_kernel.shape, generator=g))
            t.tracked_initialized.fill_(True)
    m.eval()
    return m.fuse_for_release().eval() if fused else m


def write_model(path: Path, **kwargs) -> Path:
    m = make_model(**kwargs)
    save_model(m, path, variant=kwargs.get("variant", "paragonsr2_nano"), force=True)
    return path


@pytest.fixture
def nano_ckpt(tmp_path) -> Path:
    return write_model(tmp_path / "nano_x2.safetensors")


@pytest.fixture
def nano_fused_ckpt(tmp_path) -> Path:
    return write_model(tmp_path / "nano_x2_fused.safetensors", fused=True)
