"""One validation layer for the options the commands share: every numeric option is checked here,
by name, before any command runs (finite, positive, in range), so `--threads -3`, `--target-psnr nan`
or `--atol -1` fail in a line instead of a traceback or after the full run."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

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
    "fp16_min_psnr": (0, None, False), "max_drop": (None, None, True),  # int8: a negative value disables it
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


# ---------------------------------------------------------------- option groups shared by commands
# Polygraphy's tools/args idea: an option is declared once and every command that takes it uses the
# same declaration (name, type, default, help), so they cannot drift apart.

SCALE_HELP = "Upscale factor, for checkpoints that do not record it (traiNNer-redux)."
VARIANT_HELP = "Expected variant (checked against the weights)."
ORT_THREADS_HELP = "ORT CPU threads for evaluation and timing."


def output_option(help: str, *, flag: str = "--output", dest: str | None = None, required: bool = True):
    """-o/--output (or `flag`): what the command writes; `dest` names the parameter (cli.OUTPUT_PARAMS)."""
    return click.option("-o", flag, *([dest] if dest else []), required=required, type=click.Path(path_type=Path),
                        help=help)


def force_option(help: str = "Overwrite existing outputs."):
    return click.option("--force", is_flag=True, help=help)


def threads_option(help: str = ORT_THREADS_HELP, default: int | None = 1):
    return click.option("--threads", type=int, default=default, show_default=default is not None, help=help)


def scale_option(help: str = SCALE_HELP):
    return click.option("--scale", type=int, help=help)


def variant_option(help: str = VARIANT_HELP):
    return click.option("--variant", help=help)


def calibration_options(*, crops: bool = False) -> list:
    """The calibration set's crop size, held-out split and seed (int8 and qat); `crops`: also the crops
    per image and per batch (int8). Values reach the command through `option_group`."""
    opts = [click.option("--crop", default="64x64", show_default=True, help="LR calibration crop size HxW.")]
    if crops:
        opts += [click.option("--crops-per-image", type=int, default=4, show_default=True),
                 click.option("--batch-size", type=int, default=2, show_default=True,
                              help="Crops per calibration batch (histogram calibration holds one batch's feature "
                                   "maps in memory).")]
    return opts + [
        click.option("--eval-size", default="128x128", show_default=True, help="Largest LR centre crop of held-out images."),
        click.option("--holdout", type=float, default=0.25, show_default=True, help="Fraction of folder images held out."),
        click.option("--seed", type=int, default=0, show_default=True),
    ]


def calibration_fields(crop: str, eval_size: str, holdout: float, seed: int, **crops) -> dict:
    """`calibration_options`' values as recipe fields (sizes parsed; validated before by `check`)."""
    return {"lr_size": parse_sizes(crop)[0], "eval_size": parse_sizes(eval_size)[0], "holdout": holdout, "seed": seed,
            **crops}


def option_group(name: str, build: Callable[..., object], options: list):
    """Decorator: `options` on the command, their values passed to it as one parameter `name` =
    `build(**values)` (a recipe). The raw values are validated by `check` first (cli._guarded)."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            own = {k: kwargs.pop(k) for k in names}
            return fn(*args, **kwargs, **{name: build(**own)})

        before = len(getattr(run, "__click_params__", []))
        for opt in reversed(options):
            run = opt(run)
        names = [p.name for p in run.__click_params__[before:]]
        return run
    return decorate
