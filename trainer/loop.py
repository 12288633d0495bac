"""The training loop: data -> generator (+ optional R3GAN discriminator) -> EMA -> checkpoints,
validation and logs. Runs single-process or under torchrun (DDP) when WORLD_SIZE > 1."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from paragon_export.arch import build
from paragon_export.arch.paragonsr2 import ParagonSR2
from paragon_export.checkpoint import save_model
from paragon_export.errors import ParagonError

from .data import PatchBatches, batch_loader
from .ema import EMA
from .losses import GeneratorLoss
from .r3gan import discriminator_loss
from .state import latest_checkpoint, load_run, save_run
from .validate import evaluate, val_pairs


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_static_path(model: ParagonSR2, static: bool) -> None:
    """Static path: the transformers run their tracked (deploy) kernel while the rest trains;
    the kernel generators get no gradient and the tracked kernels stay fixed."""
    for _, t in model.transformers():
        t.train(not static)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


class _Dist:
    def __init__(self, device_name: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _device(device_name)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast_buffers(self, module: nn.Module) -> None:
        # Tracked kernels are updated from each rank's own batch; rank 0's copy is the one kept.
        if self.world > 1:
            for b in module.buffers():
                torch.distributed.broadcast(b, 0)

    def average_grads(self, module: nn.Module) -> None:
        if self.world > 1:
            for p in module.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.world)

    def gather_checksums(self, *modules: nn.Module | None) -> list[str]:
        """Every rank's SHA-256 of the modules' parameters and buffers (they must all be equal)."""
        import hashlib

        h = hashlib.sha256()
        for m in modules:
            if m is not None:
                for v in m.state_dict().values():
                    h.update(v.detach().cpu().contiguous().numpy().tobytes())
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, h.hexdigest())
        return out

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _forget_logs_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their records (logged before the
    interruption) so every step appears once in metrics.jsonl."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            rec_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by the kill
        if rec_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def train(cfg: dict, *, resume: bool = False) -> dict:
    """Run (or continue) training as configured. Returns the final validation result (rank 0)."""
    dist = _Dist(cfg["train"]["device"])
    try:
        return _train(cfg, dist, resume)
    finally:
        dist.close()


def _train(cfg: dict, dist: _Dist, resume: bool) -> dict:
    mc, tc, lc = cfg["model"], cfg["train"], cfg["loss"]
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    out = Path(cfg["out_dir"])
    torch.manual_seed(cfg["seed"])
    device = dist.device
    scale, steps = mc["scale"], tc["steps"]

    model = build(mc["variant"], scale=scale, upsampler=mc["upsampler"]).to(device)
    channels_last = tc["channels_last"] is True or (tc["channels_last"] == "auto" and device.type == "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, tc["ema_decay"])
    opt_g = torch.optim.AdamW(_param_groups(model, tc["weight_decay"]), lr=tc["lr"], betas=tuple(tc["betas"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: lr_factor(
        s, total=steps, warmup=tc["warmup_steps"], min_ratio=tc["min_lr_ratio"]))
    disc = opt_d = None
    if float(lc["gan"]) > 0:
        from paragon_export.arch.munet import MUNet

        dc = cfg["discriminator"]
        disc = MUNet(in_chans=3, base_channels=dc["base_channels"]).to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=dc["lr"], betas=tuple(dc["betas"]),
                                  weight_decay=dc["weight_decay"])
    loss_fn = GeneratorLoss(lc).to(device)
    amp_dtype = _amp_dtype(tc["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    start = 0
    if resume:
        ck = latest_checkpoint(out)
        if ck is None:
            raise ParagonError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        start = load_run(ck, model=model, ema=ema, opt_g=opt_g, sched=sched, disc=disc, opt_d=opt_d,
                         scaler=scaler)
        if dist.main:
            _forget_logs_after(out / "metrics.jsonl", start)
    elif latest_checkpoint(out) is not None:
        raise ParagonError(f"{out} already holds a run; pass --resume to continue it or choose another out_dir")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))

    static_start = int(round(float(tc["static_from"]) * steps))
    net: nn.Module = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=static_start < steps)

    ds = PatchBatches(cfg["data"], scale, seed=cfg["seed"], rank=dist.rank)
    pairs = val_pairs(cfg["val"]["hr_dir"], scale, cfg["val"]["max_lr_size"]) if dist.main else []
    log_path = out / "metrics.jsonl"
    bar = None
    if dist.main and cfg["log"]["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, unit="it", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
    result: dict = {}
    t0, t_last, s_last = time.time(), time.time(), start
    model.train()
    for step, (lr, hr) in batch_loader(ds, start, steps, cfg["data"]["num_workers"]):
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        if channels_last:
            lr, hr = lr.contiguous(memory_format=torch.channels_last), hr.contiguous(memory_format=torch.channels_last)
        set_static_path(model, step >= static_start)
        with autocast():
            sr = net(lr)
        gan_on = disc is not None and step >= int(lc["gan_start"])
        if disc is not None:
            for p in disc.parameters():
                p.requires_grad_(False)
        with autocast():
            loss, parts = loss_fn(sr.float(), hr, lr=lr, disc=disc if gan_on else None, step=step)
        if not torch.isfinite(loss):
            raise ParagonError(f"loss became {float(loss)} at step {step}; lower train.lr or check the data")
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc["grad_clip"]:
            scaler.unscale_(opt_g)
            parts["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"]))
        scaler.step(opt_g)
        scaler.update()
        sched.step()
        if gan_on:
            for p in disc.parameters():
                p.requires_grad_(True)
            # R1/R2 differentiate gradients; under fp16 that needs loss scaling inside the
            # penalty, so the discriminator step uses autocast only for bf16.
            with autocast() if amp_dtype == torch.bfloat16 else contextlib.nullcontext():
                d_loss, d_parts = discriminator_loss(disc, sr.detach().float(), hr, r1_gamma=lc["r1_gamma"],
                                                     r2_gamma=lc["r2_gamma"])
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            # R1/R2 need double backward, which DDP does not support: average D's grads by hand.
            dist.average_grads(disc)
            opt_d.step()
            parts.update(d_parts)
        ema.update(model, step + 1)
        done = step + 1
        parts["loss"] = float(loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", refresh=False)
        if dist.main and (done % cfg["log"]["every"] == 0 or done == steps):
            now = time.time()
            rec = {"step": done, "lr": opt_g.param_groups[0]["lr"], "static": step >= static_start,
                   "it_s": (done - s_last) / max(1e-9, now - t_last), "elapsed_s": now - t0, **parts}
            _log(log_path, rec)
            t_last, s_last = now, done
            if bar is None:
                print(json.dumps(rec), flush=True)
        is_ckpt = done % cfg["checkpoint"]["every"] == 0 or done == steps
        is_val = cfg["val"]["every"] and (done % cfg["val"]["every"] == 0 or done == steps)
        if is_ckpt or is_val:
            dist.broadcast_buffers(model)
            dist.broadcast_buffers(ema.module)
        if is_ckpt and dist.main:
            save_run(out, done, variant=mc["variant"], model=model, ema=ema, opt_g=opt_g, sched=sched,
                     disc=disc,
                     opt_d=opt_d, config=cfg, keep=cfg["checkpoint"]["keep"], scaler=scaler)
        if is_val and dist.main:
            result = evaluate(ema.module, pairs, device=device)
            _log(log_path, {"step": done, "val": result["mean"]})
            msg = "  ".join(f"{k}={v:.4f}" for k, v in result["mean"].items() if k.endswith("psnr"))
            (bar.write if bar is not None else print)(f"[val step {done}] Y-PSNR {msg}")
        if is_ckpt or is_val:
            dist.barrier()
    if bar is not None:
        bar.close()
    if dist.world > 1 and start < steps:
        sums = dist.gather_checksums(model, ema.module, disc)
        if dist.main:
            _log(log_path, {"step": steps, "world_size": dist.world, "ranks": sums})
        if len(set(sums)) > 1:
            raise ParagonError(f"DDP ranks ended with different weights: {sums}")
    if dist.main and start < steps:
        save_model(ema.module, out / "ema_final.safetensors", variant=mc["variant"], force=True,
                   extra={"step": str(steps), "trainer": "paragon-train", "ema": "true"})
    return result
