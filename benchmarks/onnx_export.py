"""ONNX export figures per variant: node counts, file sizes, FP32 max abs, FP16 PSNR vs FP32 and vs
torch half, ORT CPU FP32 latency vs the unfused PyTorch eager model at 256x256 LR (ratio within one
run), and a 1x3x720x1280 input through ORT CPU for the large-input variants.

Every export goes through the product path (`export_onnx` on an unfused checkpoint, so fusion and
its verification run too, default verification sizes 64x64 and 45x77, FP16 with fp32 I/O).

Weights: seeded random weights give outputs of +-30 or more, where a PSNR with a data range of 1
(SPEC §6) says nothing about FP16. So each model is first fitted for --fit-steps Adam steps (L1 to HR
on the bundled training photos, static path) to make its outputs image-like; the fitted Y-PSNR on
the held-out photos is reported so nobody mistakes it for a trained model.

    .venv/bin/python benchmarks/onnx_export.py --json out/onnx_export.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from paragon_export.checkpoint import save_model
from paragon_export.errors import ParagonError
from paragon_export.export_onnx import export_onnx
from paragon_export.export_recipe import ExportRecipe
from paragon_export.images import bicubic_downscale, load_image, lr_hr_crops, sample_photo_paths
from paragon_export.metrics import psnr_y
from paragon_export.onnx_graph import ort_session, run_session
from paragon_export.seeded import seeded_model


def fitted_model(variant: str, scale: int, upsampler: str, steps: int, seed: int = 0) -> tuple[torch.nn.Module, float]:
    m = seeded_model(variant, scale, upsampler, seed)
    photos = [bicubic_downscale(load_image(p), scale) for p in sample_photo_paths("train")]
    m.eval()  # static path: the fitted convs are the ones that get fused and exported
    opt = torch.optim.Adam([p for n, p in m.named_parameters() if "kernel_generator" not in n], lr=2e-3)
    rng = np.random.default_rng(seed)
    crop = 32
    for _ in range(steps):
        lrs, hrs = [], []
        for _ in range(4):
            hr, lr = photos[rng.integers(len(photos))]
            y, x = rng.integers(lr.shape[0] - crop), rng.integers(lr.shape[1] - crop)
            lrs.append(lr[y:y + crop, x:x + crop].transpose(2, 0, 1))
            hrs.append(hr[y * scale:(y + crop) * scale, x * scale:(x + crop) * scale].transpose(2, 0, 1))
        loss = (m(torch.from_numpy(np.stack(lrs))) - torch.from_numpy(np.stack(hrs))).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ys = [psnr_y(m(torch.from_numpy(lr.transpose(2, 0, 1)[None].copy()))[0].numpy().transpose(1, 2, 0), hr, scale)
              for _, lr, hr in lr_hr_crops(sample_photo_paths("eval"), scale, (64, 64))]
    return m, float(np.mean(ys))


def export_gated(ckpt: Path, out_dir: Path) -> tuple[dict, str]:
    """FP32 + FP16 ONNX and the FP16 gate's verdict ("pass" or its error). A stand-in that misses the
    gate is exported again with the gate at 0 dB, so its figures can still be reported."""
    try:
        return export_onnx(ckpt, out_dir, ExportRecipe(fp16=True), force=True), "pass"
    except ParagonError as e:
        return export_onnx(ckpt, out_dir, ExportRecipe(fp16=True, fp16_target_psnr=0.0), force=True), str(e)


def latency(fns: dict, runs: int, warmup: int = 2) -> dict:
    """Median seconds per callable, runs interleaved so machine-load drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="paragonsr2_nano,paragonsr2_anime,paragonsr2_tiny,paragonsr2_s")
    ap.add_argument("--large", default="paragonsr2_nano,paragonsr2_s", help="variants run at 1x3x720x1280")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--upsampler", default="mks2021")
    ap.add_argument("--fit-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for variant in a.variants.split(","):
            t0 = time.perf_counter()
            model, fit_y = fitted_model(variant, a.scale, a.upsampler, a.fit_steps)
            ckpt = save_model(model, d / f"{variant}.safetensors", variant=variant, force=True).path
            t1 = time.perf_counter()
            arts, gate = export_gated(ckpt, d / variant)
            t2 = time.perf_counter()
            f32, f16 = arts["fp32"].meta, arts["fp16"].meta
            v16 = f16["verification"]
            row = {
                "variant": variant, "scale": a.scale, "upsampler": a.upsampler, "fit_steps": a.fit_steps,
                "fitted_y_psnr_eval": fit_y, "export_seconds": t2 - t1,
                "nodes_raw": sum(f32["nodes_before"].values()), "nodes_fp32": sum(f32["nodes_after"].values()),
                "nodes_fp16": sum(f16["nodes_after"].values()), "ops_fp32": f32["nodes_after"],
                "bytes_fp32": arts["fp32"].path.stat().st_size, "bytes_fp16": arts["fp16"].path.stat().st_size,
                "fusion_max_abs": f32["fusion"]["exactness_max_abs"],
                "fp32_max_abs": f32["verification"]["max_abs"],
                "fp16_gate_60db": gate, "fp16_kept_fp32": len(f16["fp16"]["kept_fp32"]),
                "fp16_error_blocking": f16["fp16"]["error_blocking"], "fp16_below_target": v16["below_target"],
                "fp16_psnr_ort_vs_fp32": v16["vs_fp32_onnx"]["min_psnr"],
                "fp16_psnr_emulated_vs_fp32": v16["emulated_vs_fp32"]["min_psnr"],
                "fp16_psnr_vs_torch_half": v16["vs_torch_half"]["min_psnr"],
                "torch_half_psnr_vs_fp32": v16["torch_half_vs_fp32"]["min_psnr"],
            }
            # Latency at 256x256 LR: ORT fp32 vs unfused eager (and fused eager), same threads, same run.
            _, lr, _ = lr_hr_crops(sample_photo_paths("eval"), a.scale, (256, 256))[0]
            x = lr.transpose(2, 0, 1)[None].copy()
            sess = ort_session(arts["fp32"].path, threads=a.threads)
            fused = model.fuse_for_release().eval()
            xt = torch.from_numpy(x)

            def eager(m):
                def run():
                    with torch.no_grad():
                        m(xt)
                return run

            lat = latency({"ort_fp32": lambda: run_session(sess, x), "torch_unfused": eager(model),
                           "torch_fused": eager(fused)}, a.runs)
            row.update({f"latency_{k}_s": v for k, v in lat.items()})
            row["ort_speedup_vs_unfused_eager"] = lat["torch_unfused"] / lat["ort_fp32"]
            if variant in a.large.split(","):
                photo = load_image(sample_photo_paths("eval")[3])  # rocket: 427x640, tiled up to 720x1280
                big = np.tile(photo, (2, 2, 1))[:720, :1280].transpose(2, 0, 1)[None].copy()
                t = time.perf_counter()
                y = run_session(sess, big)
                row["large_720x1280"] = {"seconds": time.perf_counter() - t, "output_shape": list(y.shape),
                                         "finite": bool(np.isfinite(y).all()),
                                         "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            row["fit_seconds"] = t1 - t0
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ops_fp32"}), flush=True)
    hdr = ("| variant | nodes raw -> fp32 / fp16 | KiB fp32 / fp16 | fp32 max abs | fp16 PSNR ORT / emulated / "
           "torch half (dB) | file vs torch half (dB) | ORT fp32 ms | unfused eager ms | speed-up |")
    print("\n" + hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        print(f"| {r['variant']} | {r['nodes_raw']} -> {r['nodes_fp32']} / {r['nodes_fp16']} | "
              f"{r['bytes_fp32'] / 1024:.0f} / {r['bytes_fp16'] / 1024:.0f} | {r['fp32_max_abs']:.1e} | "
              f"{r['fp16_psnr_ort_vs_fp32']:.1f} / {r['fp16_psnr_emulated_vs_fp32']:.1f} / "
              f"{r['torch_half_psnr_vs_fp32']:.1f} | {r['fp16_psnr_vs_torch_half']:.1f} | "
              f"{r['latency_ort_fp32_s'] * 1e3:.0f} | {r['latency_torch_unfused_s'] * 1e3:.0f} | "
              f"{r['ort_speedup_vs_unfused_eager']:.2f}x |")
    for r in rows:
        if "large_720x1280" in r:
            L = r["large_720x1280"]
            print(f"{r['variant']}: 1x3x720x1280 on ORT CPU ({a.threads} thread(s)) -> {L['output_shape']} in "
                  f"{L['seconds']:.1f} s, finite={L['finite']}, process peak RSS {L['peak_rss_mib']:.0f} MiB")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"threads": a.threads, "runs": a.runs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
