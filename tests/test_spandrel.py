"""ParagonSR2 through the real spandrel package (chaiNNer's loader): unfused, fused, .pth and a
traiNNer-redux original. Runs in a subprocess (see spandrel_env.py for why)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import COMPAT, write_model
from paragon_export.checkpoint import read_state_dict

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                                reason="spandrel not installed (pip install 'paragon-export[spandrel]')")


def test_spandrel_loads_our_checkpoints_and_refuses_a_scale_guess(tmp_path):
    unfused = write_model(tmp_path / "nano_x2.safetensors")
    fused = write_model(tmp_path / "nano_x2_fused.safetensors", fused=True)
    sd, _ = read_state_dict(unfused)
    pth = tmp_path / "net_g_ema.pth"
    torch.save({"params_ema": sd}, pth)  # traiNNer's .pth layout
    golden = COMPAT / "paragonsr2_e7d0b4cf_nano_x2.safetensors"
    r = subprocess.run([sys.executable, str(HERE / "spandrel_env.py"), str(HERE / "spandrel_script.py"),
                        str(unfused), str(fused), str(pth), str(golden)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SPANDREL OK" in r.stdout, r.stdout + r.stderr[-3000:]
