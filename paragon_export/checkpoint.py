"""Read and write ParagonSR2 checkpoints safely (safetensors; .pth only with weights_only=True)."""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from paragon_export.arch import ParagonSR2, detect_variant
from paragon_export.arch.paragonsr2 import VARIANTS

from . import __version__
from .artifact import Artifact, atomic_output, sha256_file
from .errors import ParagonError, metadata_int, require_file

FORMAT_VERSION = "1"
# traiNNer-style wrappers, most preferred first (EMA weights are what ship).
WRAPPERS = ("params_ema", "params", "state_dict", "model", "net_g")
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedModel:
    model: ParagonSR2
    variant: str
    scale: int
    upsampler: str
    fused: bool
    path: Path
    sha256: str

    @property
    def meta(self) -> dict:
        return dict(variant=self.variant, scale=self.scale, upsampler=self.upsampler, fused=self.fused,
                    source=str(self.path), source_sha256=self.sha256)

    @property
    def min_size(self) -> int:
        """The smallest LR side the model is meant for: its widest convolution, the 1xbk / bkx1 band
        convs, which on a narrower input read padding at every output pixel. Every size from 1x1 runs;
        exports record this (ONNX metadata "min_size") so engine profiles need not guess it from the graph."""
        return int(self.model.hparams["band_kernel_size"])


def _unwrap(flat: dict) -> dict:
    for w in WRAPPERS:
        sub = {k[len(w) + 1:]: v for k, v in flat.items() if k.startswith(w + ".")}
        if sub:
            return sub
    return flat


def _flatten(obj, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_state_dict(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (state_dict, metadata) with wrappers and `module.` prefixes removed."""
    path = Path(path)
    require_file(path, "checkpoint")
    if path.stat().st_size == 0:
        raise ParagonError(f"checkpoint {path} is empty")
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ParagonError(f"{path} is not a valid safetensors file (corrupt or truncated): {e}") from None
    elif path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        try:
            with warnings.catch_warnings():  # its pickle-protocol chatter would break the one-line error
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ParagonError(
                f"{path} holds pickled objects other than tensors; refusing to unpickle it "
                "(only weights_only .pth files are read; convert it to .safetensors)"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ParagonError(f"{path} is not a readable .pth file (corrupt or truncated): {e}") from None
        if not isinstance(obj, dict):
            raise ParagonError(f"{path} does not hold a state dict (found {type(obj).__name__})")
        flat = _flatten(obj)
    else:
        raise ParagonError(f"{path}: unsupported checkpoint type {path.suffix!r} (use .safetensors or .pth)")
    sd = _unwrap(flat)
    for p in STRIP_PREFIXES:
        sd = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ParagonError(f"{path}: entries that are not tensors: {', '.join(bad[:5])}")
    return sd, meta


def _key_report(expected: dict, got: dict) -> str | None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts) or None


def load_model(path: Path | str, *, variant: str | None = None, scale: int | None = None) -> LoadedModel:
    path = Path(path)
    sd, meta = read_state_dict(path)
    try:
        info = detect_variant(sd)
    except (ValueError, KeyError, IndexError) as e:
        raise ParagonError(f"{path}: {e}") from None
    if variant is not None and variant not in VARIANTS:
        raise ParagonError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant is not None and variant != info["variant"]:
        raise ParagonError(f"{path} holds {info['variant']} weights, not {variant} as requested")
    candidates = {"weights": info["scale"], "metadata": metadata_int(meta.get("scale"), "scale", path),
                  "--scale": scale}
    known = {k: v for k, v in candidates.items() if v is not None}
    if len(set(known.values())) > 1:
        desc = ", ".join(f"{k} says x{v}" for k, v in known.items())
        raise ParagonError(f"{path}: contradictory scale ({desc})")
    if not known:
        raise ParagonError(f"{path} does not record its scale (a traiNNer-redux checkpoint): pass --scale")
    s = next(iter(known.values()))
    if not 1 <= s <= 4:
        raise ParagonError(f"scale must be 1-4, got {s}")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise ParagonError(f"{path}: NaN/Inf weights in {', '.join(nonfinite[:3])}")
    model = ParagonSR2(scale=s, **info["hparams"])
    expected = model.state_dict()
    problem = _key_report(expected, sd)
    if problem:
        raise ParagonError(f"{path} does not match {info['variant']}: {problem}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
    model.eval()
    return LoadedModel(model=model, variant=info["variant"], scale=s, upsampler=info["upsampler"],
                       fused=info["fused"], path=path, sha256=sha256_file(path))


def save_model(model: ParagonSR2, path: Path | str, *, variant: str, force: bool = False,
               extra: dict[str, str] | None = None) -> Artifact:
    hp = model.hparams
    meta = {
        "format": "paragon-export", "format_version": FORMAT_VERSION, "toolkit_version": __version__,
        "variant": variant, "scale": str(hp["scale"]), "upsampler": hp["upsampler"],
        "fused": "true" if hp["fused"] else "false", "model_args": json.dumps(hp, sort_keys=True),
        **(extra or {}),
    }
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(_sorted_metadata(save(sd, metadata=meta)))
    return Artifact(Path(path), "checkpoint", meta)


def _sorted_metadata(blob: bytes) -> bytes:
    """safetensors writes `__metadata__` in random order (safetensors issue #584), so the same model
    saved twice would get two sha256s and miss every cache keyed on it. The header is rewritten with
    the keys sorted; it has the same length, so the tensor offsets stay valid."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # never expected (same JSON, other order); keep the library's bytes then
        return blob
    return blob[:8] + text.ljust(n) + blob[8 + n:]


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
