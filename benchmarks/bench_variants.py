"""Bench table per variant: PyTorch eager (unfused checkpoint) vs ONNX Runtime fp32 / fp16 / int8,
all through `paragon_export.bench` in one run per variant (same threads, same input, round-robin).

nano is the embedded trained default, released through `paragon_export.release` (its int8 is the
shipped one: mixed precision searched against the 0.10 dB target). Other variants have no trained
checkpoint: they get the stand-in weights of `onnx_export.py` (seeded, fitted a few steps so outputs
are image-like), ONNX from `export_onnx` (FP16 gate at 0 dB when the stand-in misses it, recorded)
and int8 from `quantize_int8` with no accuracy target, so every conv with a stored weight is int8:
a mixed-precision search on untrained weights would measure nothing.

The default set also times s at 512x512 (`--extra-sizes`): at 256x256 s is still far from its
large-input throughput, which is what a user upscaling photos gets.

    .venv/bin/python benchmarks/bench_variants.py --variants paragonsr2_nano,paragonsr2_s --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from onnx_export import export_gated, fitted_model
from paragon_export.bench import bench
from paragon_export.checkpoint import save_model
from paragon_export.defaults import default_checkpoint
from paragon_export.images import parse_sizes
from paragon_export.int8 import quantize_int8
from paragon_export.int8_recipe import Int8Recipe
from paragon_export.release import release


def artifacts(variant: str, work: Path, fit_steps: int) -> tuple[list[Path], dict]:
    if variant == "paragonsr2_nano":
        t = time.perf_counter()
        manifest = release(None, work / "release", engine=False, progress=lambda _m: None)
        made = {a["kind"]: work / "release" / a["path"] for rec in manifest["steps"].values() for a in rec["artifacts"]}
        return [default_checkpoint(), made["onnx-fp32"], made["onnx-fp16"], made["onnx-int8"]], {
            "weights": "embedded trained default", "int8": "release (mixed precision, 0.10 dB target)",
            "release_seconds": round(time.perf_counter() - t, 1)}
    model, fit_y = fitted_model(variant, 2, "mks2021", fit_steps)
    ckpt = save_model(model, work / f"{variant}.safetensors", variant=variant, force=True).path
    info = {"weights": f"stand-in, fitted {fit_steps} steps (held-out Y-PSNR {fit_y:.2f} dB)"}
    arts, info["fp16_gate"] = export_gated(ckpt, work / "onnx")
    q = quantize_int8(arts["fp32"].path, work / "int8", Int8Recipe(max_drop=None), peer=False, force=True)
    info["int8"] = f"all {q.mixed_precision.quantizable_nodes} quantizable convs int8 (no target)"
    return [ckpt, arts["fp32"].path, arts["fp16"].path, q.path], info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="paragonsr2_nano,paragonsr2_s")
    ap.add_argument("--sizes", default="256x256")
    ap.add_argument("--extra-sizes", default="paragonsr2_s=512x512",
                    help="VARIANT=HxW[,HxW][;VARIANT=...]: sizes added for one variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--fit-steps", type=int, default=150)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra = dict(item.split("=", 1) for item in a.extra_sizes.split(";") if item)
    out = []
    for variant in a.variants.split(","):
        sizes = parse_sizes(a.sizes)
        sizes += [hw for hw in parse_sizes(extra[variant]) if hw not in sizes] if variant in extra else []
        with tempfile.TemporaryDirectory() as d:
            paths, info = artifacts(variant, Path(d), a.fit_steps)
            report = bench(paths, sizes=sizes, threads=a.threads, runs=a.runs)
        print(f"\n## {variant}: {json.dumps(info)}\n{report.markdown()}", flush=True)
        out.append({"variant": variant, **info, "bench": report.to_json()})
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
