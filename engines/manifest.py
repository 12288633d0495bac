"""`manifest.json` of an engine folder: one entry per engine, keyed by its EngineKey digest.

Reads never see a half-written file (writes go to a temp file renamed into place), and concurrent
builds into one folder do not lose each other's entries (read-modify-write under a lock file).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from paragon_export.artifact import atomic_output
from paragon_export.errors import ParagonError

MANIFEST = "manifest.json"
FORMAT = "paragon-export/engines"
VERSION = 1


def empty() -> dict:
    return {"format": FORMAT, "version": VERSION, "engines": {}}


def read_manifest(folder: Path | str) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return empty()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParagonError(f"{path} is unreadable ({e}); move it away to start a new manifest") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("engines"), dict):
        raise ParagonError(f"{path} is not a paragon-export engine manifest")
    if data.get("version", 0) > VERSION:
        raise ParagonError(f"{path} has manifest version {data['version']}; this paragon-export reads up to {VERSION}")
    return data


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".manifest.lock", "a") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; atomic rename still protects readers
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write(folder: Path, data: dict) -> None:
    with atomic_output(folder / MANIFEST, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def put_entry(folder: Path | str, digest: str, entry: dict) -> None:
    folder = Path(folder)
    with _locked(folder):
        data = read_manifest(folder)
        data["engines"][digest] = entry
        _write(folder, data)


def remove_entry(folder: Path | str, digest: str) -> None:
    folder = Path(folder)
    with _locked(folder):
        data = read_manifest(folder)
        if data["engines"].pop(digest, None) is not None:
            _write(folder, data)


def entry_for_file(folder: Path | str, filename: str) -> tuple[str, dict] | None:
    for digest, entry in read_manifest(folder)["engines"].items():
        if entry.get("file") == filename:
            return digest, entry
    return None
