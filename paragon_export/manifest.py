"""The release manifest: one record per pipeline step, keyed by a hash of its inputs and options,
so a rerun can skip every step whose inputs did not change."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from . import __version__
from .artifact import atomic_output, sha256_file

SCHEMA_VERSION = 1
_TOOLS = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxconverter-common", "polygraphy", "nvidia-modelopt",
          "tensorrt", "numpy", "scikit-image")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "paragon-export": __version__}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def step_key(name: str, inputs: dict[str, str], params: dict) -> str:
    """Hash of what determines a step's output: input file hashes, options, toolkit version."""
    blob = json.dumps({"step": name, "inputs": inputs, "params": params, "toolkit": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Manifest:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / "manifest.json"
        self.data: dict = {"schema_version": SCHEMA_VERSION, "steps": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                if loaded.get("schema_version") == SCHEMA_VERSION:
                    self.data = loaded
            except (json.JSONDecodeError, OSError):
                pass  # an unreadable manifest only costs a rebuild

    def fresh(self, name: str, key: str) -> dict | None:
        """The recorded step if its key matches and every output is intact, else None."""
        rec = self.data["steps"].get(name)
        if not rec or rec.get("key") != key:
            return None
        for art in rec.get("artifacts", []):
            p = self.root / art["path"]
            if not p.is_file() or sha256_file(p) != art["sha256"]:
                return None
        return rec

    def record(self, name: str, rec: dict) -> None:
        self.data["steps"][name] = rec
        self.save()

    def drop(self, name: str) -> None:
        if self.data["steps"].pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        self.data["tool_versions"] = tool_versions()
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path, force=True) as tmp:  # fsynced, temp cleaned if a later run finds it
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str))
