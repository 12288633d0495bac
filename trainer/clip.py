"""CLIP contrastive loss: InfoNCE in a frozen CLIP image-embedding space where each SR crop's positive
is its HR crop and its negatives are its own bicubic upscale and the other crops of the batch.

The encoder is `transformers`' CLIPVisionModelWithProjection (the optional `[clip]` extra). open_clip
is not used: it imports torchvision, whose PyPI wheels are CUDA builds that fail to import beside
a CPU torch ("operator torchvision::nms does not exist"); transformers' CLIP needs no torchvision.
Weights come from a local Hugging Face CLIP folder (config.json + model.safetensors, either a full
CLIPModel or a vision-only checkpoint); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paragon_export.errors import ParagonError

from .perceptual import load_weights

# CLIP's own normalisation (OpenAI's training statistics); a preprocessor_config.json overrides it.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _clip_classes():
    """transformers' CLIP classes, or one clear error naming the missing extra or the broken import."""
    try:
        import transformers  # noqa: F401  (lazy package: cheap, and tells "not installed" apart)
    except ImportError:
        raise ParagonError("loss.clip needs the optional CLIP extra: "
                           "pip install -c constraints.txt 'paragon-export[clip]'") from None
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    except Exception as e:  # transformers imports torchvision when present; a CUDA wheel beside CPU torch fails
        raise ParagonError(f"cannot import transformers' CLIP model ({_first_line(e)}); a torchvision that "
                           "does not match torch breaks it: uninstall torchvision or install its matching "
                           "build") from None
    return CLIPVisionConfig, CLIPVisionModelWithProjection


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _locate(path: str | Path | None) -> tuple[Path, Path]:
    """(weights file, folder holding config.json) for a weights file or a model folder."""
    if path is None:
        raise ParagonError("loss.clip needs local weights: set loss.clip_weights to a Hugging Face CLIP "
                           "folder or its model.safetensors (no downloads are made)")
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in _WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise ParagonError(f"CLIP weights folder {path} holds no {' or '.join(_WEIGHT_FILES)}")
        return found[0], path
    if not path.is_file():
        raise ParagonError(f"CLIP weights file {path} does not exist (no downloads are made; save a Hugging "
                           "Face CLIP model there: config.json + model.safetensors)")
    return path, path.parent


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParagonError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise ParagonError(f"{path} must hold a JSON object")
    return data


def _vision_config(folder: Path) -> dict:
    """The vision tower's config from a CLIPModel or CLIPVisionModel(WithProjection) config.json."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ParagonError(f"CLIP weights need their config.json beside them ({cfg_path} is missing): the "
                           "architecture (heads, activation) cannot be read from the tensors alone")
    data = _read_json(cfg_path)
    if "vision_config" in data:  # full CLIPModel: the projection size is a top-level key
        vc = dict(data["vision_config"] or {})
        if "projection_dim" in data:
            vc["projection_dim"] = data["projection_dim"]
        return vc
    return data


def _preprocessing(folder: Path) -> tuple[tuple, tuple]:
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return OPENAI_MEAN, OPENAI_STD
    data = _read_json(pre)
    mean, std = data.get("image_mean", OPENAI_MEAN), data.get("image_std", OPENAI_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ParagonError(f"{pre}: image_mean/image_std must have 3 values")
    return tuple(mean), tuple(std)


def load_clip_vision(path: str | Path | None) -> tuple[nn.Module, tuple, tuple]:
    """(frozen CLIP vision encoder with projection, mean, std) from local files."""
    weights, folder = _locate(path)
    vc = _vision_config(folder)
    config_cls, model_cls = _clip_classes()
    try:
        config = config_cls(**{k: v for k, v in vc.items() if k not in ("model_type", "transformers_version")})
        model = model_cls(config)
    except Exception as e:  # bad values in a user's config.json
        raise ParagonError(f"{folder / 'config.json'}: not a CLIP vision config ({_first_line(e)})") from None
    expected = model.state_dict()
    sd = load_weights(weights, "CLIP", expected)
    model.load_state_dict(sd)
    return model, *_preprocessing(folder)


def info_nce(sr: torch.Tensor, hr: torch.Tensor, bic: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE over the batch: row i scores sr_i against every hr_j (positive j = i, the others are
    in-batch negatives) and against its own bicubic upscale bic_i (the hard negative)."""
    sr, hr, bic = (F.normalize(e.float(), dim=-1) for e in (sr, hr, bic))
    logits = torch.cat([sr @ hr.T, (sr * bic).sum(-1, keepdim=True)], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(len(sr), device=sr.device))


class ClipContrastive(nn.Module):
    """Frozen CLIP image encoder + InfoNCE with bicubic negatives; `forward(sr, hr, lr)`."""

    def __init__(self, weights: str | Path | None, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ParagonError("loss.clip_temperature must be > 0")
        self.encoder, mean, std = load_clip_vision(weights)
        self.temperature = float(temperature)
        self.size = int(self.encoder.config.image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # always eval: the encoder is a fixed metric
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's processor on-graph: shortest side to image_size (bicubic, antialiased), centre crop,
        normalise. Differentiable, so gradients reach the SR image; no clamp, which would zero them."""
        x = x.float()
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        size = (max(self.size, round(h * s)), max(self.size, round(w * s)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=self.preprocess(x)).image_embeds

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        # Bicubic upscale of the LR input, clamped like any bicubic output image: the "no detail" negative.
        bic = F.interpolate(lr.float(), size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        with torch.no_grad():  # targets and negatives need no graph
            hr_e, bic_e = self.embed(torch.cat([hr.float(), bic])).chunk(2)
        sr_e = self.embed(sr)
        # The similarity/softmax runs in fp32 whatever autocast the encoder ran under (AMP safety).
        with torch.autocast(sr.device.type, enabled=False):
            return info_nce(sr_e, hr_e, bic_e, self.temperature)
