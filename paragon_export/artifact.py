"""Artifacts (a file plus its metadata) and atomic writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import ownership
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


def refuse_inputs(out: Path | str, inputs=(), *, contains: bool = True) -> None:
    """An output that is, or (when it is replaced as a whole) contains, an input would destroy it: refuse."""
    out_abs = Path(os.path.realpath(out))
    for i in inputs or ():
        if i is None or not Path(i).exists():
            continue
        i_abs = Path(os.path.realpath(i))
        if i_abs == out_abs or (out_abs.exists() and os.path.samefile(i_abs, out_abs)):
            raise ParagonError(f"output {out} is the input {i}: choose another output")
        if contains and i_abs.is_relative_to(out_abs):
            raise ParagonError(f"output {out} contains the input {i}: choose another output")


def check_output(path: Path | str, *, force: bool = False, inputs=(), update: bool = False) -> Path:
    """Refuse to clobber an existing output (with --force: anything the toolkit did not write) or an
    input, fail early on an unwritable folder, and clear this folder of our dead runs' temps."""
    path = Path(path)
    refuse_inputs(path, inputs)
    if path.exists() or path.is_symlink():
        if not force:
            raise ParagonError(f"{path} already exists (use --force to overwrite)")
        if not update and not ownership.toolkit_wrote(path):
            raise ParagonError(f"{path} exists and was not written by paragon-export (or was changed since): "
                               "--force replaces only the toolkit's own outputs; move it away or choose another output")
    try:
        check_output_dir(path.parent)
    except ParagonError as e:
        raise ParagonError(f"cannot write {path}: {e}") from None
    ownership.clean_stale_temps(path.parent)
    return path


def write_error(e: OSError, path: Path) -> ParagonError:
    """One line for an OSError while writing `path` (ENOSPC names the file and the folder)."""
    if e.errno == errno.ENOSPC:
        return ParagonError(f"no space left on the device while writing {path} (free space in {path.parent} "
                            "and run again)")
    return ParagonError(f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_output(path: Path | str, *, force: bool = False, inputs=(), update: bool = False) -> Iterator[Path]:
    """Yield a temp path next to `path`; fsync and rename it into place only if the block succeeds.
    `force` replaces only what the toolkit wrote; `inputs` may never be overwritten. `update`: the
    file is one the caller reads and rewrites by design (a TensorRT timing cache), whoever wrote it."""
    path = check_output(path, force=force, inputs=inputs, update=update)
    if path.is_dir():
        raise ParagonError(f"{path} is a folder: give a file name to write")
    try:
        fd, tmp = tempfile.mkstemp(prefix=ownership.temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    ownership.record(path)


@contextlib.contextmanager
def atomic_folder(path: Path | str, *, force: bool = False, inputs=()) -> Iterator[Path]:
    """A folder written as a whole: yield a temp folder next to `path`, swap it into place on success.
    With `force` an existing folder is replaced only if it is exactly what the toolkit wrote there."""
    path = Path(os.path.abspath(path))  # "." has no name to build a temp name from
    path = check_output(path, force=force, inputs=inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=ownership.temp_prefix(path.name), dir=path.parent))
    except OSError as e:
        raise write_error(e, path) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=ownership.temp_prefix(path.name), dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ownership.record(path)


def _fsync(path: Path) -> None:
    """Data on disk before the rename, so a crash leaves the old file or the new one, not a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
