"""What decides an int8 model, as plain data stored in its report (ModelOpt's config-as-data): the
calibration set, the range method, the accuracy target of the mixed-precision search and the dtype of
the unquantized remainder. Where the files go and how much is printed are not part of it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from paragon_export.calibration import DEFAULT_EVAL_SIZE, DEFAULT_LR_SIZE
from paragon_export.calibration.ranges import USER_METHODS

from .errors import ParagonError
from .int8_remainder import REMAINDERS


@dataclass(frozen=True)
class Int8Recipe:
    method: str = "percentile"  # activation ranges: minmax | percentile | entropy
    target_psnr: float | None = None  # held-out PSNR vs fp32 the search must reach
    max_drop: float | None = 0.10  # largest held-out Y-PSNR drop vs fp32 (dB)
    node_budget: int | None = None  # most nodes kept in float (None: 40 % of the quantizable ones)
    bias_correction: bool = True
    remainder: str = "fp16"  # dtype of the unquantized part
    lr_size: tuple[int, int] = DEFAULT_LR_SIZE  # calibration crops
    crops_per_image: int = 4
    batch_size: int = 2
    eval_size: tuple[int, int] = DEFAULT_EVAL_SIZE  # held-out centre crop (LR)
    holdout: float = 0.25
    seed: int = 0

    def check(self) -> Int8Recipe:
        if self.method not in USER_METHODS:
            raise ParagonError(f"unknown calibration method {self.method!r} (choose {', '.join(USER_METHODS)})")
        if self.remainder not in REMAINDERS:
            raise ParagonError(f"--remainder must be one of {', '.join(REMAINDERS)}, got {self.remainder!r}")
        if self.node_budget is not None and self.node_budget < 0:
            raise ParagonError("node budget must be >= 0")
        for name in ("target_psnr", "max_drop"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ParagonError(f"{name.replace('_', ' ')} must be a finite number, got {v}")
        return self

    def search_options(self) -> dict:
        """The options of the mixed-precision search (`int8_search.mixed_precision`'s keywords)."""
        return {"target_psnr": self.target_psnr, "max_drop": self.max_drop, "node_budget": self.node_budget,
                "bias_correction": self.bias_correction}

    def as_dict(self) -> dict:
        return asdict(self)
