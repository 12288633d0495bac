"""Imports the real spandrel package for the spandrel tests, which run in a subprocess (`python
tests/spandrel_env.py SCRIPT`) so nothing below leaks into the rest of the test session.

spandrel's LaMa and RestoreFormer modules import `torchvision.transforms.functional` at import time.
Where torchvision cannot be imported (PyPI's torchvision wheels link CUDA libraries and fail beside a
CPU-only torch build: "operator torchvision::nms does not exist"), those three names are supplied
by a stub that raises if called. ParagonSR2's path through spandrel never calls them; with a working
torchvision the stub is not installed.
"""

import sys
import types


def _stub_torchvision() -> None:
    def unavailable(*_a, **_k):
        raise RuntimeError("torchvision is not importable here (test stub)")

    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__path__ = []
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = type("InterpolationMode", (), {"BILINEAR": "bilinear", "NEAREST": "nearest"})
    functional.rotate = functional.normalize = unavailable
    tv.transforms, transforms.functional = transforms, functional
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


try:
    import torchvision  # noqa: F401
except Exception:  # ImportError, or RuntimeError from a CUDA-linked build beside a CPU torch
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        del sys.modules[name]
    _stub_torchvision()

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    exec(compile(open(script).read(), script, "exec"), {"__name__": "__main__"})
