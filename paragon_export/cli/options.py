"""One validation layer for the options the commands share: every numeric option is checked here,
by name, before any command runs (finite, positive, in range), so `--threads -3`, `--target-psnr nan`
or `--atol -1` fail in a line instead of a traceback or after the full run."""

from __future__ import annotations

import math

import click

from ..images import parse_sizes

# name -> (lowest allowed, highest allowed, whether the lowest is allowed itself); None = unbounded.
# Every float option must also be finite.
RULES: dict[str, tuple[float | None, float | None, bool]] = {
    "threads": (1, None, True), "train_threads": (1, None, True),
    "scale": (1, None, True),
    "tile": (0, None, True), "overlap": (0, None, True),
    "runs": (1, None, True), "warmup": (0, None, True),
    "steps": (0, None, True), "batch": (1, None, True), "patch": (8, None, True),
    "batch_size": (1, None, True), "crops_per_image": (1, None, True), "node_budget": (0, None, True),
    "eval_every": (1, None, True), "save_every": (1, None, True),
    "lr": (None, None, True), "gt_weight": (0, None, True),  # qat says "lr > 0" itself
    "atol": (0, None, False), "min_psnr": (0, None, True), "target_psnr": (0, None, False),
    "fp16_min_psnr": (0, None, False), "max_drop": (0, None, True),
    "holdout": (0, 1, False), "workspace": (0, None, False),
}
SIZE_OPTIONS = ("sizes", "crop", "eval_size")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(kwargs: dict) -> None:
    """Raise click.BadParameter for the first option value outside its rule."""
    for name, value in kwargs.items():
        if name in SIZE_OPTIONS and isinstance(value, str):
            from ..errors import ParagonError

            try:
                parse_sizes(value)
            except ParagonError as e:
                raise click.BadParameter(str(e), param_hint=_flag(name)) from None
        if name not in RULES or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high, low_ok = RULES[name]
        if isinstance(value, float) and not math.isfinite(value):
            raise click.BadParameter(f"must be a finite number, not {value}", param_hint=_flag(name))
        if low is not None and (value < low or (value == low and not low_ok)):
            raise click.BadParameter(f"must be {'>=' if low_ok else '>'} {low:g} (got {value:g})", param_hint=_flag(name))
        if high is not None and value > high:
            raise click.BadParameter(f"must be <= {high:g} (got {value:g})", param_hint=_flag(name))
