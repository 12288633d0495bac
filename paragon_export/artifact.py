"""Artifacts (a file plus its metadata) and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ParagonError


@dataclass
class Artifact:
    path: Path
    kind: str  # "checkpoint", "onnx", "engine", ...
    meta: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(folder: Path | str) -> Path:
    """Create `folder` if needed and prove it writable."""
    folder = Path(folder) if str(folder) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise ParagonError(f"{folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParagonError(f"cannot create output folder {folder}: {e.strerror}") from None
    try:  # a real probe: os.access says yes to root even on read-only mounts
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ParagonError(f"output folder {folder} is not writable: {e.strerror}") from None
    return folder


def check_output(path: Path | str, *, force: bool = False) -> Path:
    """Refuse to clobber an existing output and fail early on an unwritable folder."""
    path = Path(path)
    if path.exists() and not force:
        raise ParagonError(f"{path} already exists (use --force to overwrite)")
    try:
        check_output_dir(path.parent)
    except ParagonError as e:
        raise ParagonError(f"cannot write {path}: {e}") from None
    return path


@contextlib.contextmanager
def atomic_output(path: Path | str, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it into place only if the block succeeds."""
    path = check_output(path, force=force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ParagonError(f"cannot write to {path.parent}: {e.strerror}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
