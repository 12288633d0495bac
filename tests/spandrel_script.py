"""Run by test_spandrel.py through spandrel_env.py (a subprocess): checks against the real spandrel package."""

import sys
from pathlib import Path

import torch
from safetensors import safe_open

import paragon_export.spandrel_arch as sa
from paragon_export.checkpoint import load_model
from spandrel import ImageModelDescriptor, ModelLoader

unfused, fused, pth, golden = map(Path, sys.argv[1:5])
torch.set_num_threads(1)
x = torch.rand(1, 3, 23, 31, generator=torch.Generator().manual_seed(0))
ref = load_model(unfused).model.eval()
with torch.no_grad():
    want = ref(x).clamp(0, 1)  # spandrel clamps every output to [0, 1]
for path in (unfused, fused, pth):
    d = ModelLoader().load_from_file(path)
    assert isinstance(d, ImageModelDescriptor) and d.architecture.id == "ParagonSR2", path
    assert d.scale == 2 and d.supports_half and d.size_requirements.none and d.purpose == "SR", (path, d.scale)
    with torch.no_grad():
        got = d(x)
        tiny = d(torch.rand(1, 3, 1, 1))
    err = (got - want).abs().max().item()
    assert err < 1e-5, (path, err)
    assert tuple(tiny.shape) == (1, 3, 2, 2)
    print(f"{path.name}: {d.tags} x{d.scale} max abs vs paragon_export {err:.2e}")

# A traiNNer-redux original (legacy Magic head): spandrel cannot know its scale -> a clear error.
try:
    ModelLoader().load_from_file(golden)
except ValueError as e:
    assert "scale" in str(e) and "legacy" in str(e), e
    print("golden via ModelLoader:", str(e)[:80])
else:
    raise AssertionError("a legacy original without a scale loaded")
# ... and with the recorded scale, the output the original code produced.
d = sa.load_file(golden)
with safe_open(str(golden), "pt") as f:
    inp, out = f.get_tensor("io.input"), f.get_tensor("io.out_static")
with torch.no_grad():
    err = (d(inp) - out.clamp(0, 1)).abs().max().item()
assert d.scale == out.shape[-1] // inp.shape[-1] and err < 1e-5, (d.scale, err)
print(f"golden via load_file: x{d.scale} max abs vs original {err:.2e}")
print("SPANDREL OK")
