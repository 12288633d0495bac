"""The int8 mixed-precision search's outcome, cached like the calibration ranges: the same fp32
model, calibration set, method and search options give the same Q/DQ model, so a rerun (a new
release folder, the QAT baseline) replays it with one held-out measurement instead of searching."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

SEARCH_VERSION = 1  # bump when the search or the recipe changes what it produces


def search_cache_base(ranges_path: Path, options: dict) -> Path:
    """`ranges_path` is the calibration cache file: its name already keys model sha256, calibration
    fingerprint and method; `options` are every other input of the search."""
    key = json.dumps({"ranges": ranges_path.name, "options": options, "version": SEARCH_VERSION},
                     sort_keys=True, default=str)
    return ranges_path.parent / f"search-{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def load_search(base: Path) -> dict | None:
    """The cached search (its report fields plus "model" bytes), or None when absent or damaged."""
    try:
        doc = json.loads(base.with_suffix(".json").read_text())
        model = base.with_suffix(".onnx").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("model_sha256") != hashlib.sha256(model).hexdigest():
        return None
    return {**doc, "model": model}


def store_search(base: Path, mp: dict) -> None:
    """Write the model, then the JSON that names its sha256 (a reader never sees a half pair)."""
    model = mp["model"]
    doc = {k: v for k, v in mp.items() if k not in ("model", "quality")}
    doc["model_sha256"] = hashlib.sha256(model).hexdigest()
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for suffix, data in ((".onnx", model), (".json", json.dumps(doc, default=_plain).encode())):
            fd, tmp = tempfile.mkstemp(dir=base.parent, prefix=f".{base.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, base.with_suffix(suffix))
    except OSError:
        pass  # a cache that cannot be written only costs the next run its search


def _plain(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
