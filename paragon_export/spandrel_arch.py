"""ParagonSR2 for spandrel (chaiNNer's model loader): `import paragon_export.spandrel_arch` adds it to
spandrel's MAIN_REGISTRY, after which `spandrel.ModelLoader().load_from_file(path)` loads our unfused
and fused checkpoints and original traiNNer-redux ones. Needs `pip install 'paragon-export[spandrel]'`.

spandrel hands an architecture only the state dict, never the file's metadata, so the scale must come
from the weights: mks2021 and pixelshuffle heads fix it, the legacy Magic head (every traiNNer-redux
original) does not. Such a file is refused with a clear error instead of a guessed scale; `load_file`
below reads the recorded scale (safetensors metadata) or takes `scale=` and returns the same descriptor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from spandrel import MAIN_REGISTRY, Architecture, ArchSupport, ImageModelDescriptor, SizeRequirements

from paragon_export.arch import ParagonSR2, detect_variant

from .checkpoint import STRIP_PREFIXES, WRAPPERS, read_state_dict
from .errors import ParagonError

ARCH_ID = "ParagonSR2"


def _clean(state_dict: dict) -> dict:
    """Flat keys as our loader sees them: traiNNer-style wrappers (`params_ema.`, `state_dict.` ...)
    and `module.` prefixes removed, anything that is not a tensor dropped (spandrel may pass both)."""
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for w in WRAPPERS:
        sub = {k[len(w) + 1:]: v for k, v in sd.items() if k.startswith(w + ".")}
        if sub:
            sd = sub
            break
    for p in STRIP_PREFIXES:
        sd = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
    return sd


def _detect(state_dict: dict) -> bool:
    sd = _clean(state_dict)
    if "conv_in.weight" not in sd or "magic_upsampler.sharpen.conv_h.weight" not in sd and "upsampler.weight" not in sd:
        return False
    try:
        detect_variant(sd)
    except (ValueError, KeyError, IndexError):
        return False
    return True


class ParagonSR2Arch(Architecture[ParagonSR2]):
    def __init__(self) -> None:
        super().__init__(id=ARCH_ID, name="ParagonSR2", detect=_detect)

    def load(self, state_dict: dict, scale: int | None = None) -> ImageModelDescriptor[ParagonSR2]:
        sd = _clean(state_dict)
        info = detect_variant(sd)
        s = _scale(info, scale)
        model = ParagonSR2(scale=s, **info["hparams"])
        expected = model.state_dict()
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
        model.eval()
        if not info["fused"]:
            missing = model.uninitialized_kernels()
            if missing:
                # Eval would silently run identity kernels: the original's EMA defect (SPEC section 2).
                raise ValueError(f"ParagonSR2: {len(missing)} tracked kernels were never initialised; "
                                 "fuse it with `paragon-export fuse --calibrate-kernels DIR` first")
        tags = [info["variant"].removeprefix("paragonsr2_"), info["upsampler"], "fused" if info["fused"] else "unfused"]
        return ImageModelDescriptor(
            model, state_dict, architecture=self, purpose="SR" if s > 1 else "Restoration", tags=tags,
            # fp16: verified by parity's torch .half() row; bf16 is not verified.
            supports_half=True, supports_bfloat16=False, scale=s, input_channels=info["hparams"]["in_chans"],
            output_channels=3,
            # Fully convolutional with zero / edge-replicating padding: any size from 1x1 runs.
            size_requirements=SizeRequirements(),
        )


def _scale(info: dict, scale: int | None) -> int:
    if info["scale"] is not None:
        if scale is not None and scale != info["scale"]:
            raise ValueError(f"ParagonSR2: the weights are x{info['scale']}, not x{scale}")
        return info["scale"]
    if scale is None:
        raise ValueError(
            f"ParagonSR2 {info['variant']} with the legacy Magic upsampler (a traiNNer-redux original): its scale "
            "is not in the weights and spandrel passes no file metadata. Load it with "
            "paragon_export.spandrel_arch.load_file(path, scale=N), which also reads a scale recorded "
            "in the file's metadata (as `paragon-export fuse --scale N` writes it)")
    return scale


ARCHITECTURE = ParagonSR2Arch()


def register() -> None:
    """Add ParagonSR2 to spandrel's main registry (idempotent)."""
    MAIN_REGISTRY.add(ArchSupport.from_architecture(ARCHITECTURE), ignore_duplicates=True)


def load_file(path: Path | str, *, scale: int | None = None) -> ImageModelDescriptor[ParagonSR2]:
    """Like ModelLoader().load_from_file, but reads the scale that our checkpoints (and the goldens)
    record in safetensors metadata, or takes `scale` (for legacy originals that record none)."""
    sd, meta = read_state_dict(path)
    recorded = int(meta["scale"]) if str(meta.get("scale", "")).isdigit() else None
    if scale is not None and recorded is not None and scale != recorded:
        raise ParagonError(f"{path}: metadata says x{recorded}, not x{scale}")
    try:
        return ARCHITECTURE.load(sd, scale=scale or recorded)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise ParagonError(f"{path}: {e}") from None


register()
