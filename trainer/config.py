"""Training configuration: defaults, YAML file, `key.sub=value` overrides, strict key checking.

A typo in a config key must fail loudly (naming the key), not silently train with a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from paragon_export.errors import ParagonError

DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/paragonsr2",
    "seed": 0,
    "threads": 0,  # torch intra-op threads; 0 leaves torch's default
    "model": {"variant": "paragonsr2_nano", "scale": 2, "upsampler": "mks2021"},
    "data": {
        "hr_dir": None,  # null: the bundled training photos (paragon_export.images "train" split)
        "lr_dir": None,  # set for paired LR/HR mode (files matched by name); degradations then unused
        "lr_crop": 48,  # LR patch side; HR patch is lr_crop * scale
        "batch_size": 8,
        "num_workers": 0,
        "cache": True,  # keep decoded HR images in memory
        "augment": True,  # random flips and 90-degree rotations
        "downscale": ["bicubic"],  # chosen at random per patch from bicubic / bilinear / area
        "blur_prob": 0.0, "blur_sigma": [0.2, 1.2],
        "noise_prob": 0.0, "noise_sigma": [0.0, 0.02],
        "jpeg_prob": 0.0, "jpeg_quality": [70, 95],
    },
    "train": {
        "steps": 10000,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "betas": [0.9, 0.99],
        "warmup_steps": 200,
        "min_lr_ratio": 0.01,
        "grad_clip": 1.0,  # max global grad norm; 0 disables
        "ema_decay": 0.999,
        # From this fraction of `steps` on, train through the static (deploy) kernels so the shipped
        # fused model is the one that was optimised; 1.0 disables.
        "static_from": 0.8,
        "amp": "auto",  # auto: bf16/fp16 autocast on CUDA, off on CPU; or "off", "bf16", "fp16"
        "channels_last": "auto",  # auto: on for CUDA
        "device": "auto",
    },
    "loss": {
        "l1": 1.0, "msssim": 0.0, "ffl": 0.0, "hsluv": 0.0, "perceptual": 0.0, "dists": 0.0, "clip": 0.0,
        "gan": 0.0,
        "r1_gamma": 1.0, "r2_gamma": 1.0,
        "vgg_weights": None,  # local state dict for the perceptual loss (VGG19 features)
        "dists_weights": None,  # local state dict for DISTS (VGG16 features + alpha/beta)
        # local Hugging Face CLIP folder (config.json + model.safetensors) or its weights file
        "clip_weights": None,
        "clip_temperature": 0.1,  # InfoNCE temperature of the clip loss
        "gan_start": 0,  # step at which the adversarial loss switches on
    },
    "discriminator": {"base_channels": 64, "lr": 1e-4, "betas": [0.0, 0.99], "weight_decay": 0.0},
    "checkpoint": {"every": 500, "keep": 2},
    "val": {
        "every": 1000,
        "hr_dir": None,  # null: the bundled held-out photos ("eval" split)
        "max_lr_size": 0,  # centre-crop LR to at most this side (0: full images)
    },
    "log": {"every": 50, "progress": True},
}


def _merge(base: dict, new: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        name = f"{prefix}{k}"
        if k not in base:
            raise ParagonError(f"unknown config key {name!r}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ParagonError(f"config key {name!r} must be a mapping")
            out[k] = _merge(base[k], v, name + ".")
        else:
            out[k] = _coerce(name, base[k], v)
    return out


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Numbers given as strings (YAML reads `1e-3` as a string) become the default's type."""
    if isinstance(default, bool) or default is None or value is None:
        return value
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise ParagonError(f"config key {name!r} must be a number, got {value!r}") from None
        if isinstance(default, int) and num.is_integer() and not isinstance(value, float):
            return int(num)
        return num
    return value


def _nest(key: str, value: Any) -> dict:
    d: dict = {}
    cur = d
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return d


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ParagonError(f"bad override {text!r} (expected key.sub=value)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParagonError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParagonError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise ParagonError(f"config file {path} must hold a mapping")
        cfg = _merge(cfg, data)
    for o in overrides:
        key, value = parse_override(o)
        cfg = _merge(cfg, _nest(key, value))
    _validate(cfg)
    _validate_optimiser(cfg)
    _validate_out_dir(Path(str(cfg["out_dir"])))
    return cfg


# key -> (lowest, highest or None, whether the lowest is allowed): torch would otherwise raise a
# ValueError traceback (a negative lr) or train silently wrong (an EMA decay above 1).
OPTIMISER_RANGES = {
    "train.lr": (0.0, None, False), "train.weight_decay": (0.0, None, True), "train.warmup_steps": (0, None, True),
    "train.min_lr_ratio": (0.0, 1.0, True), "train.grad_clip": (0.0, None, True), "train.ema_decay": (0.0, 1.0, True),
    "discriminator.lr": (0.0, None, False), "discriminator.weight_decay": (0.0, None, True),
}


def _validate_optimiser(cfg: dict) -> None:
    import math

    for key, (low, high, low_ok) in OPTIMISER_RANGES.items():
        section, name = key.split(".")
        v = cfg[section][name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ParagonError(f"{key} must be a finite number, got {v!r}")
        if v < low or (v == low and not low_ok) or (high is not None and v > high):
            rng = f"in [{low:g}, {high:g}]" if high is not None else f"{'>=' if low_ok else '>'} {low:g}"
            raise ParagonError(f"{key} must be {rng}, got {v:g}")
    for key in ("train.betas", "discriminator.betas"):
        section, name = key.split(".")
        b = cfg[section][name]
        if (not isinstance(b, (list, tuple)) or len(b) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)):
            raise ParagonError(f"{key} must be two numbers in [0, 1), got {b!r}")


def _validate_out_dir(out: Path) -> None:
    """The run folder must be creatable: no part of its path may be an existing file."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ParagonError(f"out_dir {out}: {parent} is a file, not a folder")
            return


def _validate(cfg: dict) -> None:
    from paragon_export.arch import UPSAMPLERS, VARIANTS

    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    if m["variant"] not in VARIANTS:
        raise ParagonError(f"unknown variant {m['variant']!r}; known: {', '.join(VARIANTS)}")
    if m["upsampler"] not in UPSAMPLERS:
        raise ParagonError(f"model.upsampler must be one of {', '.join(UPSAMPLERS)}")
    if not isinstance(m["scale"], int) or not 1 <= m["scale"] <= 4:
        raise ParagonError("model.scale must be an integer 1-4")
    bad = [k for k in d["downscale"] if k not in ("bicubic", "bilinear", "area")]
    if bad or not d["downscale"]:
        raise ParagonError(f"data.downscale must list bicubic/bilinear/area, got {d['downscale']}")
    for key in ("lr_crop", "batch_size"):
        if not isinstance(d[key], int) or d[key] < 1:
            raise ParagonError(f"data.{key} must be a positive integer")
    if not isinstance(t["steps"], int) or t["steps"] < 1:
        raise ParagonError("train.steps must be a positive integer")
    if not 0.0 <= float(t["static_from"]) <= 1.0:
        raise ParagonError("train.static_from must be in [0, 1]")
    if t["amp"] not in ("auto", "off", "bf16", "fp16"):
        raise ParagonError("train.amp must be auto, off, bf16 or fp16")
    for k in ("l1", "msssim", "ffl", "hsluv", "perceptual", "dists", "clip", "gan"):
        if float(cfg["loss"][k]) < 0:
            raise ParagonError(f"loss.{k} must be >= 0")
    if not float(cfg["loss"]["clip_temperature"]) > 0:
        raise ParagonError("loss.clip_temperature must be > 0")
    for k in ("every",):
        if int(cfg["checkpoint"][k]) < 1 or int(cfg["val"][k]) < 0:
            raise ParagonError(f"checkpoint.{k} must be >= 1 and val.{k} >= 0")
