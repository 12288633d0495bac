"""Run checkpoints: weights and full training state, without pickle, written atomically.

Layout: <out_dir>/checkpoints/step_<8-digit step>/{generator,ema,discriminator,state}.safetensors +
state.json, and <out_dir>/checkpoints/latest (name of the newest complete folder). A folder is
assembled under a temp name and renamed into place, and `latest` is replaced atomically, so a run
killed at any moment resumes from the previous interval at worst.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from paragon_export.checkpoint import save_model
from paragon_export.errors import ParagonError


def _opt_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _opt_from_flat(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def _jsonable(obj):
    return [_jsonable(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tuples(obj):
    return tuple(_tuples(o) for o in obj) if isinstance(obj, list) else obj


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuples(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def _module_sd(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}


def save_run(out_dir: Path, step: int, *, variant: str, model, ema, opt_g, sched, disc=None, opt_d=None,
             config: dict, keep: int = 2, scaler=None) -> Path:
    ckdir = Path(out_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    for stale in ckdir.glob(".step_*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    final = ckdir / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=ckdir))
    try:
        extra = {"step": str(step), "trainer": "paragon-train"}
        save_model(model, tmp / "generator.safetensors", variant=variant, extra=extra, force=True)
        save_model(ema.module, tmp / "ema.safetensors", variant=variant, extra={**extra, "ema": "true"}, force=True)
        tensors, og_meta = _opt_to_flat(opt_g, "opt_g")
        rng_t, rng_meta = _rng_state()
        tensors.update(rng_t)
        meta = {"step": step, "opt_g": og_meta, "sched": {k: v for k, v in sched.state_dict().items()
                                                          if k != "lr_lambdas"},
                "rng": rng_meta, "config": config,
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
        if disc is not None:
            save_file(_module_sd(disc), str(tmp / "discriminator.safetensors"),
                      metadata={"arch": "MUNet", "model_args": json.dumps(disc.hparams), "step": str(step)})
            od_t, od_meta = _opt_to_flat(opt_d, "opt_d")
            tensors.update(od_t)
            meta["opt_d"] = od_meta
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"step": str(step)})
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd, ptr = tempfile.mkstemp(prefix=".latest.", dir=ckdir)
    with os.fdopen(fd, "w") as f:
        f.write(final.name)
    os.replace(ptr, ckdir / "latest")
    old = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and p != final)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    ptr = Path(out_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    path = ptr.parent / ptr.read_text().strip()
    return path if path.is_dir() else None


def load_run(path: Path, *, model, ema, opt_g, sched, disc=None, opt_d=None, scaler=None) -> int:
    """Restore everything saved by `save_run`; returns the step to continue from."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        model.load_state_dict(load_file(str(path / "generator.safetensors")), strict=True)
        ema.module.load_state_dict(load_file(str(path / "ema.safetensors")), strict=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ParagonError(f"cannot resume from {path}: {e}".splitlines()[0]) from None
    _opt_from_flat(opt_g, "opt_g", tensors, meta["opt_g"])
    sched.load_state_dict({**meta["sched"], "lr_lambdas": [None] * len(opt_g.param_groups)})
    if disc is not None:
        if "opt_d" not in meta:
            raise ParagonError(f"cannot resume from {path}: it has no discriminator (GAN was off in that run)")
        disc.load_state_dict(load_file(str(path / "discriminator.safetensors")), strict=True)
        _opt_from_flat(opt_d, "opt_d", tensors, meta["opt_d"])
    if scaler is not None and scaler.is_enabled() and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    _set_rng_state(tensors, meta["rng"])
    return int(meta["step"])
