"""What the toolkit wrote, and its own leftovers.

`--force` may replace only files the toolkit wrote. The proof is a per-folder ledger
(`.paragon-export.json`, only where needed: name -> sha256 of what was renamed into place, or the file listing of a
folder written as a whole) kept by the atomic writers in `artifact` for files whose own metadata cannot prove it (images,
some reports); checkpoints, ONNX files, tagged JSON, our markdown and parity folders prove it themselves. A file the user
changed after we wrote it no longer matches its hash, so it counts as theirs.

Temp files and folders carry the writer's PID (`.NAME.paragon-PID.<random>[.tmp]`); the next writer
in that folder removes those whose process is gone (a SIGKILL or a full disk leaves them behind).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

LEDGER = ".paragon-export.json"
LOCK = ".paragon-export.lock"
_TEMP = re.compile(r"^\..+\.paragon-(\d+)\.[^/]+$")


def temp_prefix(name: str) -> str:
    return f".{name}.paragon-{os.getpid()}."


def is_toolkit_temp(name: str) -> bool:
    return bool(_TEMP.match(name))


def hidden_own(name: str) -> bool:
    """Files that are ours and not outputs: the ledger, locks and temps."""
    return name in (LEDGER, LOCK) or is_toolkit_temp(name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove temps left by toolkit processes that no longer run; returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if not m or pid_alive(int(m.group(1))):
            continue
        p = folder / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass  # another cleaner got there first, or no permission: harmless
    return removed


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (our hidden files excluded)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not hidden_own(d)]
        for f in files:
            if not hidden_own(f):
                p = Path(root) / f
                out[p.relative_to(folder).as_posix()] = _sha(p)
    return out


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise ledger updates of one folder (flock on the folder itself: no extra file)."""
    try:
        import fcntl
    except ImportError:  # Windows: last writer wins, the ledger stays valid JSON (atomic rename)
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(folder: Path) -> dict:
    try:
        data = json.loads((folder / LEDGER).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(path: Path) -> None:
    """Note that the toolkit just wrote `path` (a file, or a folder written as a whole)."""
    path = Path(path)
    folder = path.parent
    if _is_our_parity_folder(path) if path.is_dir() else _has_our_metadata(path):
        forget(path)  # its own metadata proves it (and the folder stays free of bookkeeping)
        return
    entry = {"folder": listing(path)} if path.is_dir() else {"sha256": _sha(path)}
    try:
        with _locked(folder):
            data = _read(folder)
            data[path.name] = entry
            tmp = folder / f"{temp_prefix(LEDGER)}tmp"
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, folder / LEDGER)
    except OSError:
        pass  # the output itself is written; without its entry a later --force is refused, never wrong


def forget(path: Path) -> None:
    folder = Path(path).parent
    if not (folder / LEDGER).is_file():
        return
    with contextlib.suppress(OSError), _locked(folder):
        data = _read(folder)
        if data.pop(Path(path).name, None) is not None:
            tmp = folder / f"{temp_prefix(LEDGER)}tmp"
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, folder / LEDGER)


def toolkit_wrote(path: Path) -> bool:
    """True if `path` is exactly what the toolkit wrote (ledger), or carries its metadata."""
    path = Path(path)
    entry = _read(path.parent).get(path.name)
    if isinstance(entry, dict):
        try:
            if path.is_dir() and not path.is_symlink():
                if entry.get("folder") == listing(path):
                    return True
            elif path.is_file() and entry.get("sha256") == _sha(path):
                return True
        except OSError:
            return False
    if path.is_dir() and not path.is_symlink():
        return _is_our_parity_folder(path)
    return path.is_file() and not path.is_symlink() and _has_our_metadata(path)


def _is_our_parity_folder(path: Path) -> bool:
    """A parity report folder from before the ledger: exactly the files its parity.json lists."""
    try:
        report = json.loads((path / "parity.json").read_text())
        outs = report["outputs"]
        expected = {outs["json"], outs["markdown"], *outs["pngs"]}
        return report.get("schema") == "paragon-export/parity" and set(listing(path)) == expected
    except (OSError, ValueError, KeyError, TypeError):
        return False


_OUR_MARKDOWN = re.compile(r"^# (paragonsr2_\w+ x\d+ release|Parity: (PASS|FAIL))$")


def _has_our_metadata(path: Path) -> bool:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n > 100 << 20:
                    return False
                meta = json.loads(f.read(n)).get("__metadata__") or {}
            return str(meta.get("format", "")).startswith("paragon-export")
        if suffix == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            return any(p.key == "producer" and p.value == "paragon-export" for p in model.metadata_props)
        if suffix == ".json" and path.stat().st_size < 64 << 20:
            data = json.loads(path.read_text())
            tags = [str(data.get(k, "")) for k in ("format", "schema")] if isinstance(data, dict) else []
            versions = data.get("tool_versions") if isinstance(data, dict) else None
            return any(t.startswith("paragon-export") for t in tags) or (
                isinstance(versions, dict) and "paragon-export" in versions)
        if suffix == ".md":  # MODEL_CARD.md and parity.md open with a heading only we write
            with open(path, encoding="utf-8", errors="replace") as f:
                return bool(_OUR_MARKDOWN.match(f.readline().rstrip("\n")))
    except Exception:  # unreadable or foreign: not provably ours
        return False
    return False
