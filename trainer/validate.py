"""Held-out quality of a generator: Y-PSNR/SSIM (SPEC §6) for bicubic, dynamic kernels, static
kernels (unfused) and the fused deploy model, so the train/deploy gap is always visible."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from paragon_export.arch import ParagonSR2
from paragon_export.images import (bicubic_downscale, bicubic_upscale, list_images, load_image,
                                   sample_photo_paths, to_image, to_tensor)
from paragon_export.metrics import psnr_y, ssim_y

MODES = ("bicubic", "dynamic", "static", "fused")


def val_pairs(hr_dir: Path | str | None, scale: int, max_lr_size: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(name, lr, hr)] with LR made by bicubic downscale; optionally centre-cropped."""
    paths = sample_photo_paths("eval") if hr_dir is None else list_images(hr_dir)
    out = []
    for p in paths:
        hr = load_image(p)
        if max_lr_size:
            h, w = min(hr.shape[0], max_lr_size * scale), min(hr.shape[1], max_lr_size * scale)
            top, left = (hr.shape[0] - h) // 2, (hr.shape[1] - w) // 2
            hr = hr[top:top + h, left:left + w]
        hr, lr = bicubic_downscale(hr, scale)
        out.append((p.stem, lr, hr))
    return out


@torch.no_grad()
def evaluate(model: ParagonSR2, pairs, *, device: str | torch.device = "cpu") -> dict:
    """Per-image and mean Y-PSNR/SSIM for each mode. `model` is left unchanged."""
    scale = model.scale
    m = copy.deepcopy(model).to(device).eval()
    fused = m.fuse_for_release().to(device).eval() if not m.uninitialized_kernels() else None
    rows = []
    for name, lr, hr in pairs:
        x = to_tensor(lr).to(device)
        outs = {"bicubic": bicubic_upscale(lr, scale)}
        m.set_dynamic_inference(True)
        outs["dynamic"] = to_image(m(x))
        m.set_dynamic_inference(False)
        outs["static"] = to_image(m(x))
        if fused is not None:
            outs["fused"] = to_image(fused(x))
        row = {"image": name}
        for mode, sr in outs.items():
            row[f"{mode}_psnr"] = psnr_y(sr, hr, scale)
            row[f"{mode}_ssim"] = ssim_y(sr, hr, scale)
        rows.append(row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    return {"mean": mean, "images": rows}


def format_table(result: dict) -> str:
    """Markdown table: one row per image plus the mean, PSNR/SSIM per mode."""
    modes = [m for m in MODES if f"{m}_psnr" in result["mean"]]
    head = "| image | " + " | ".join(f"{m} PSNR / SSIM" for m in modes) + " |"
    sep = "|---" * (len(modes) + 1) + "|"
    lines = [head, sep]
    for r in result["images"] + [{"image": "**mean**", **result["mean"]}]:
        cells = [f"{r[f'{m}_psnr']:.2f} / {r[f'{m}_ssim']:.4f}" for m in modes]
        lines.append(f"| {r['image']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
