"""qat_recipe: what decides a QAT model, as plain data stored in its report (ModelOpt's config-as-data):
steps, learning rate, batch, patch size, ground-truth weight, Magic-Conv filter precision, seed, how
often it measures and saves, and the calibration set's crops and held-out split. Where the files go,
threads and how much is printed are not part of it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from paragon_export.calibration import DEFAULT_EVAL_SIZE, DEFAULT_LR_SIZE

from .errors import ParagonError

DEFAULT_STEPS = 1500
DEFAULT_LR = 5e-4
DEFAULT_BATCH = 8
DEFAULT_PATCH = 48  # LR pixels


@dataclass(frozen=True)
class QATRecipe:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch: int = DEFAULT_BATCH
    patch: int = DEFAULT_PATCH
    gt_weight: float = 0.0
    magic: str = "int8"
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_size: tuple[int, int] = DEFAULT_LR_SIZE  # calibration crops (LR)
    crops_per_image: int = 4
    batch_size: int = 2  # calibration crops per batch
    eval_size: tuple[int, int] = DEFAULT_EVAL_SIZE  # held-out centre crop (LR)
    holdout: float = 0.25  # fraction of the folder's images held out

    def check(self) -> QATRecipe:
        if self.steps < 0 or self.batch < 1 or self.patch < 8 or self.eval_every < 1 or self.save_every < 1:
            raise ParagonError("qat needs steps >= 0, batch >= 1, patch >= 8, eval/save intervals >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.gt_weight >= 0 and math.isfinite(self.gt_weight)):
            raise ParagonError(f"qat needs lr > 0 and gt weight >= 0 (got lr={self.lr}, gt weight={self.gt_weight})")
        return self

    # What a resumed run must share with the saved one (steps and the learning rate may change).
    def identity(self) -> dict:
        return {"batch": self.batch, "patch": self.patch, "gt_weight": self.gt_weight, "magic": self.magic,
                "seed": self.seed}

    def calibration(self) -> dict:
        """`calibration.build_calibration_set`'s keywords."""
        return {"lr_size": self.lr_size, "crops_per_image": self.crops_per_image, "batch_size": self.batch_size,
                "eval_size": self.eval_size, "holdout": self.holdout, "seed": self.seed}

    def as_dict(self) -> dict:
        return asdict(self)
