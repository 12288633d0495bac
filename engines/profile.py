"""The one TensorRT optimization profile an engine is built with, over the LR input's N/H/W.

Written `min:opt:max`, each shape `NxCxHxW` or `HxW` (batch 1, 3 channels), or picked by preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from paragon_export.errors import ParagonError

from .onnx_info import OnnxInfo

Shape = tuple[int, int, int, int]

# LR input sizes (the profile is on the model input, not on the upscaled output).
PRESETS: dict[str, tuple[Shape, Shape, Shape]] = {
    # Video frames up to 1280x720 in either orientation (portrait phone video is 1280 high), tuned for
    # landscape, e.g. 720p -> 1440p at x2 or -> 4K at x3.
    "720p": ((1, 3, 64, 64), (1, 3, 720, 1280), (1, 3, 1280, 1280)),
    # Frames up to 1920x1080 in either orientation, tuned for landscape, e.g. 1080p -> 4K at x2.
    "1080p": ((1, 3, 64, 64), (1, 3, 1080, 1920), (1, 3, 1920, 1920)),
    # Tiled upscaling of large (4K-class) images: 512x512 tiles plus up to 32 px overlap per side,
    # up to 4 tiles a batch; 64 px is the smallest edge tile.
    "4k-tiles": ((1, 3, 64, 64), (4, 3, 512, 512), (4, 3, 576, 576)),
}
DEFAULT_PRESET = "720p"


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape

    def __str__(self) -> str:
        return ":".join("x".join(str(d) for d in s) for s in (self.min, self.opt, self.max))

    def as_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


def _parse_shape(text: str, whole: str) -> Shape:
    parts = text.strip().lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 2:
        dims = [1, 3, *dims]
    if len(dims) != 4:
        raise ParagonError(f"bad profile {whole!r}: {text!r} is not NxCxHxW or HxW")
    return tuple(dims)  # type: ignore[return-value]


def parse_profile(text: str) -> Profile:
    """'1x3x64x64:1x3x720x1280:1x3x1080x1920' or '64x64:720x1280:1080x1920' -> Profile (not yet validated)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ParagonError(f"bad profile {text!r}: expected min:opt:max, e.g. 64x64:512x512:1080x1920")
    return Profile(*(_parse_shape(p, text) for p in parts))


def preset_profile(name: str) -> Profile:
    if name not in PRESETS:
        raise ParagonError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return Profile(*PRESETS[name])


def validate_profile(p: Profile, model: OnnxInfo) -> Profile:
    """Check a profile against itself and the model; returns it unchanged or raises ParagonError."""
    names = ("batch", "channels", "height", "width")
    for shape in (p.min, p.opt, p.max):
        if any(d < 1 for d in shape):
            raise ParagonError(f"profile {p}: every dimension must be >= 1")
        if shape[1] != 3:
            raise ParagonError(f"profile {p}: the channel count must be 3 (RGB), got {shape[1]}")
    for i, name in enumerate(names):
        if not p.min[i] <= p.opt[i] <= p.max[i]:
            raise ParagonError(f"profile {p}: {name} must satisfy min <= opt <= max "
                               f"({p.min[i]}, {p.opt[i]}, {p.max[i]})")
    mh, mw = model.min_hw
    if p.min[2] < mh or p.min[3] < mw:
        raise ParagonError(f"profile {p}: min {p.min[2]}x{p.min[3]} is below the model's minimum input "
                           f"{mh}x{mw} (HxW)")
    for i, name in enumerate(names):
        fixed = model.input_dims[i]
        if fixed is not None and not p.min[i] == p.opt[i] == p.max[i] == fixed:
            raise ParagonError(f"profile {p}: {model.path.name} has a fixed {name} of {fixed}, so min, opt and max "
                               f"{name} must all be {fixed}")
    return p


def choose_profile(model: OnnxInfo, *, profile: str | None = None, preset: str | None = None) -> Profile:
    """The validated profile for a build: --profile, --preset, or a default that fits the model."""
    if profile and preset:
        raise ParagonError("give either --profile or --preset, not both")
    if profile:
        return validate_profile(parse_profile(profile), model)
    dims = model.input_dims
    if preset is None and dims[2] is not None and dims[3] is not None:
        # A static-shape export admits exactly one shape: default to it.
        fixed = (dims[0] or 1, 3, dims[2], dims[3])
        return validate_profile(Profile(fixed, fixed, fixed), model)
    p = preset_profile(preset or DEFAULT_PRESET)
    if dims[0] is not None:
        # Presets are a convenience: follow a model exported with a fixed batch.
        p = Profile(*((dims[0], *s[1:]) for s in (p.min, p.opt, p.max)))
    return validate_profile(p, model)
