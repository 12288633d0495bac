"""The toolkit's embedded default model: paragonsr2_nano x2 (mks2021), trained by the bundled trainer
on real photos (see data/MODEL_CARD.md). Unfused, so `fuse` and the kernel-gap checks run on it."""

from __future__ import annotations

from pathlib import Path

from .errors import ParagonError

DEFAULT_CHECKPOINT_NAME = "paragonsr2_nano_x2.safetensors"


def default_checkpoint() -> Path:
    path = Path(__file__).parent / "data" / DEFAULT_CHECKPOINT_NAME
    if not path.is_file():
        raise ParagonError(f"the embedded default model {path} is missing (broken install?)")
    return path
