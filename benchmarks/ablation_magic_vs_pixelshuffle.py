"""Magic-Conv vs PixelShuffle: the ablation the seed promised.

Same variant (width and depth) with each upsampler head: `mks2021` (Magic Kernel Sharp 2021,
edge-replicating), `legacy` (traiNNer-redux taps, zero padding) and `pixelshuffle` (conv C->C*s*s +
PixelShuffle). For each: parameter counts, ONNX op list (the shipped export: fused, simplified,
verified, dynamic H/W), speed (PyTorch eager and ONNX Runtime, through `paragon_export.bench`), tile seams (tiled
without overlap vs whole image, error near tile borders) and quality on held-out photos when trained
checkpoints are given (`--trained mks2021=CKPT`...). Without them the weights are seeded random:
speed, ops and seams do not depend on training, quality does and is then not reported.

    .venv/bin/python benchmarks/ablation_magic_vs_pixelshuffle.py --variant paragonsr2_nano --sizes 256x256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from paragon_export.artifact import atomic_output
from paragon_export.bench import bench
from paragon_export.checkpoint import load_model, param_count, save_model
from paragon_export.errors import ParagonError
from paragon_export.seeded import seeded_model
from paragon_export.images import bicubic_downscale, bicubic_upscale, load_image, parse_sizes, sample_photo_paths
from paragon_export.metrics import psnr_y, ssim_y
from paragon_export.upscale import tile_starts, upscale_array

UPSAMPLERS = ("mks2021", "legacy", "pixelshuffle")


def export_onnx(model: torch.nn.Module, path: Path, *, variant: str, scale: int, upsampler: str,
                threads: int) -> dict[str, int]:
    """The shipped export (simplified, verified fp32 ONNX with dynamic H/W); returns its op counts."""
    from paragon_export import export_onnx as exporter

    art = exporter.export_model(model, path, meta=dict(scale=str(scale), variant=variant, upsampler=upsampler,
                                                       precision="fp32"), force=True)
    return dict(sorted(art.meta["nodes_after"].items()))


def seam_errors(model: torch.nn.Module, scale: int, tile: int, overlap: int) -> dict:
    """Tiled vs whole-image output on a real photo: max |error| near tile borders (+-2 LR px) and elsewhere."""
    hr = load_image(sample_photo_paths("eval")[1])  # chelsea
    lr = bicubic_downscale(hr, scale)[1][:96, :160]

    def fn(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    whole = upscale_array(fn, lr, scale=scale, tile=0, overlap=0)
    tiled = upscale_array(fn, lr, scale=scale, tile=tile, overlap=overlap)
    err = np.abs(tiled - whole)
    near = np.zeros(err.shape[:2], bool)
    for axis, length in ((0, lr.shape[0]), (1, lr.shape[1])):
        for s in tile_starts(length, tile, overlap):
            for edge in (s, s + tile):
                if 0 < edge < length:
                    sl = slice((edge - 2) * scale, (edge + 2) * scale)
                    if axis == 0:
                        near[sl, :] = True
                    else:
                        near[:, sl] = True
    signed = (tiled - whole)[near]
    return dict(tile=tile, overlap=overlap, max_abs_at_borders=float(err[near].max()),
                mean_signed_at_borders=float(signed.mean()), max_abs_elsewhere=float(err[~near].max()))


def quality(path: Path | None, scale: int = 0) -> dict:
    """Held-out Y-PSNR/SSIM of a checkpoint, or of bicubic upscaling when `path` is None."""
    loaded = load_model(path) if path is not None else None
    s, rows = loaded.scale if loaded else scale, []
    for p in sample_photo_paths("eval"):
        hr, lr = bicubic_downscale(load_image(p), s)
        if loaded is None:
            sr = bicubic_upscale(lr, s)
        else:
            with torch.inference_mode():
                sr = loaded.model(torch.from_numpy(lr.transpose(2, 0, 1)[None].copy()))[0].numpy().transpose(1, 2, 0)
        rows.append((p.stem, psnr_y(np.clip(sr, 0, 1), hr, s), ssim_y(np.clip(sr, 0, 1), hr, s)))
    return dict(images={n: dict(psnr_y=a, ssim_y=b) for n, a, b in rows},
                mean_psnr_y=float(np.mean([r[1] for r in rows])), mean_ssim_y=float(np.mean([r[2] for r in rows])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="paragonsr2_nano")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--sizes", default="256x256", help="LR sizes for the speed table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--trained", action="append", default=[], metavar="UPSAMPLER=CKPT",
                    help="a trained checkpoint for an upsampler head (repeat); enables the quality table")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        trained = dict(t.split("=", 1) for t in args.trained)
        unknown = set(trained) - set(UPSAMPLERS)
        if unknown or any("=" not in t for t in args.trained):
            raise ParagonError(f"--trained takes UPSAMPLER=CKPT with UPSAMPLER in {', '.join(UPSAMPLERS)}")
        torch.set_num_threads(args.threads)
        out = run(args.variant, args.scale, sizes, args.threads, args.runs, {k: Path(v) for k, v in trained.items()})
        if args.json:
            with atomic_output(args.json, force=True) as tmp:
                tmp.write_text(json.dumps(out, indent=2) + "\n")
            print(f"wrote {args.json}")
    except ParagonError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


def run(variant: str, scale: int, sizes, threads: int, runs: int, trained: dict[str, Path]) -> dict:
    weights = "seeded random for ops, seams and speed" + (
        f"; trained checkpoints for quality ({', '.join(trained)})" if trained else " (no trained checkpoints given)")
    out: dict = dict(variant=variant, scale=scale, weights=weights, heads={})
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        artifacts = []
        for ups in UPSAMPLERS:
            m = seeded_model(variant, scale, ups)
            fused = m.fuse_for_release().eval()
            ckpt = save_model(fused, tmp / f"{ups}_fused.safetensors", variant=variant).path
            ops = export_onnx(fused, tmp / f"{ups}_fp32.onnx", variant=variant, scale=scale, upsampler=ups,
                              threads=threads)
            out["heads"][ups] = dict(params_unfused=param_count(m), params_fused=param_count(fused), onnx_ops=ops,
                                     seams_no_overlap=seam_errors(fused, scale, 48, 0),
                                     seams_overlap_16=seam_errors(fused, scale, 48, 16))
            artifacts += [ckpt, tmp / f"{ups}_fp32.onnx"]
        print(f"{variant} x{scale}, weights: {out['weights']}\n")
        print("| head | params (unfused -> fused) | ONNX ops (shipped fp32 export) |")
        print("|---|---|---|")
        for ups, h in out["heads"].items():
            ops = ", ".join(f"{k} {v}" for k, v in h["onnx_ops"].items())
            print(f"| {ups} | {h['params_unfused']:,} -> {h['params_fused']:,} | {ops} |")
        print("\nTile seams on a real photo (48 px tiles): max |tiled - whole| near tile borders / elsewhere,"
              " mean signed error near borders")
        for ups, h in out["heads"].items():
            a, b = h["seams_no_overlap"], h["seams_overlap_16"]
            print(f"  {ups:12s} overlap 0: {a['max_abs_at_borders']:.2e} / {a['max_abs_elsewhere']:.2e} "
                  f"(signed {a['mean_signed_at_borders']:+.1e});  overlap 16: {b['max_abs_at_borders']:.2e} / "
                  f"{b['max_abs_elsewhere']:.2e}")
        # One bench run for all six artifacts: every ratio is against mks2021's eager model.
        report = bench(artifacts, sizes=sizes, threads=threads, runs=runs, warmup=2)
        out["speed"] = report.to_json()
        print("\nSpeed (fused models; ratios against the mks2021 head in PyTorch eager):")
        print(report.markdown())
    if trained:
        out["quality"] = {ups: quality(p) for ups, p in trained.items()}
        out["quality_bicubic"] = quality(None, scale)
        print("\nQuality on held-out photos (Y-PSNR / Y-SSIM, border = scale):")
        print(f"  {'bicubic':12s} {out['quality_bicubic']['mean_psnr_y']:.2f} dB / "
              f"{out['quality_bicubic']['mean_ssim_y']:.4f}")
        for ups, q in out["quality"].items():
            print(f"  {ups:12s} {q['mean_psnr_y']:.2f} dB / {q['mean_ssim_y']:.4f}")
    else:
        out["quality"] = None
        print("\nQuality: not measured. No trained checkpoints of these heads exist yet; seeded random weights say "
              "nothing about quality. Train one per head (same data and schedule) and pass "
              "--trained mks2021=CKPT --trained pixelshuffle=CKPT.")
    return out


if __name__ == "__main__":
    sys.exit(main())
