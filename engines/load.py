"""Loading an engine file written earlier: `load_engine` returns its bytes and manifest entry only when
it was built for this GPU and TensorRT version (`current_target`), else raises `EngineMismatch` naming
the rebuild command.

Kept apart from `build` so that `runners` can refuse a foreign engine without importing the builder
(and, through it, the check, which opens its reference through `runners`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from paragon_export.artifact import sha256_file
from paragon_export.errors import ParagonError

from .gpu import GpuInfo, query_gpu
from .identity import EngineKey, incompatibility
from .manifest import entry_for_file
from .trt import require_tensorrt


@dataclass(frozen=True)
class Target:
    """Where engines are built and run: the GPU and the TensorRT version."""
    gpu: GpuInfo
    trt_version: str
    trt: object = None  # the tensorrt module (None for a fake target)


def current_target() -> Target:
    trt = require_tensorrt()
    return Target(gpu=query_gpu(), trt_version=trt.__version__, trt=trt)


class EngineMismatch(ParagonError):
    """The engine was built for another GPU or TensorRT version; `entry` says from what to rebuild."""

    def __init__(self, message: str, path: Path, entry: dict):
        super().__init__(message)
        self.path, self.entry = path, entry


def manifest_entry(path: Path) -> tuple[str, dict]:
    """(digest, entry) of the engine file `path` in its folder's manifest; a one-line error without one."""
    if not path.is_file():
        raise ParagonError(f"{path} does not exist")
    found = entry_for_file(path.parent, path.name)
    if found is None:
        raise ParagonError(f"{path.name} has no entry in {path.parent / 'manifest.json'}, so which GPU and TensorRT "
                           "built it is unknown: build it again with `paragon-export engine MODEL.onnx -o "
                           f"{path.parent}`")
    return found


def load_engine(path: Path | str, *, target: Target | None = None) -> tuple[bytes, dict]:
    """The engine's bytes and manifest entry, if it was built for this GPU and TensorRT version.

    Raises EngineMismatch (a ParagonError) naming both sides and the rebuild command otherwise.
    """
    path = Path(path)
    _, entry = manifest_entry(path)
    key = EngineKey.from_dict(entry["key"])
    target = target or current_target()
    why = incompatibility(key, target.gpu, target.trt_version)
    if why:
        raise EngineMismatch(f"refusing to load {path.name}: {why}. Rebuild it for this GPU with "
                             f"`paragon-export engine {path} --rebuild` (from {entry['onnx']['path']})", path, entry)
    data = path.read_bytes()
    if sha256_file(path) != entry.get("engine_sha256"):
        raise ParagonError(f"{path.name} does not match its manifest entry (modified or truncated): rebuild it with "
                           f"`paragon-export engine {path} --rebuild`")
    return data, entry
