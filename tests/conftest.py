"""Shared fixtures: small seeded ParagonSR2 models whose every block contributes to the output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from paragon_export.checkpoint import save_model
from paragon_export.seeded import seeded_model

# One thread: oversubscribed cores make multi-threaded torch CPU convs 10-30x slower.
torch.set_num_threads(1)

# Copied from ../shared/compat so that a clean checkout tests without the shared folder.
COMPAT = Path(__file__).resolve().parent / "golden"


def benchmark_module(name: str):
    """A script of benchmarks/ (not a package) loaded as a module, so a test can call its main()."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_model(variant: str = "paragonsr2_nano", scale: int = 2, upsampler: str = "mks2021", seed: int = 0,
               fused: bool = False):
    m = seeded_model(variant, scale, upsampler, seed)
    return m.fuse_for_release().eval() if fused else m


def write_model(path: Path, **kwargs) -> Path:
    m = make_model(**kwargs)
    save_model(m, path, variant=kwargs.get("variant", "paragonsr2_nano"), force=True)
    return path


def export_onnx_file(model: torch.nn.Module, path: Path, *, scale: int | None = None) -> Path:
    """Plain fp32 ONNX of `model` (TorchScript exporter, dynamic H/W, names input/output), with the
    scale in metadata_props when given; for tests that need an ONNX file but do not test the export."""
    import io
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(1, 3, 32, 32), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {2: "h", 3: "w"}, "output": {2: "H", 3: "W"}})
    m = onnx.load_from_string(buf.getvalue())
    if scale:
        m.metadata_props.add(key="scale", value=str(scale))
    onnx.save(m, str(path))
    return path


@pytest.fixture
def nano_ckpt(tmp_path) -> Path:
    return write_model(tmp_path / "nano_x2.safetensors")


@pytest.fixture
def nano_fused_ckpt(tmp_path) -> Path:
    return write_model(tmp_path / "nano_x2_fused.safetensors", fused=True)
