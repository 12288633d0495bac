"""CPU-time ratios of one release's fp32 files across runtimes: torch eager (fused checkpoint), ONNX
Runtime, OpenVINO and NCNN, each behind `runners.open_runner`, at a fixed thread count.

All runners are built and warmed up first; the timed runs go round-robin (one of each in turn) and
the whole set is repeated, so load drift on a shared machine hits every runtime alike. The figure is
the process's CPU time (`time.process_time`, all threads) of one inference, so a busy machine
stretches wall time but not this. Prints the median per repeat, then the ratio vs torch eager as the
median over repeats with its range. A runtime that is not installed is left out with its reason.

    .venv/bin/python benchmarks/runtimes_cpu_time.py release --threads 1 --size 256x256 --runs 15 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from paragon_export.bench import bench_input
from paragon_export.images import parse_sizes
from paragon_export.runners import RuntimeUnavailable, open_runner


def _files(release: Path) -> list[tuple[str, Path, str | None]]:
    fused = next(release.glob("*_fused.safetensors"))
    onnx = next(release.glob("*_fp32_op*.onnx"))
    rows = [("torch eager fp32 (fused)", fused, None), ("ORT fp32", onnx, "onnxruntime"),
            ("OpenVINO fp32", onnx, "openvino")]
    rows += [("NCNN fp32", p, "ncnn") for p in release.glob("ncnn/*_fp32.param")]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release", type=Path, help="a `paragon-export release` folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default="256x256", help="LR HxW")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per runtime and repeat")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    (h, w), = parse_sizes(args.size)
    x = OrderedDict(input=bench_input(h, w))
    live = []
    for name, path, rt in _files(args.release):
        try:
            r = open_runner(path, rt, threads=args.threads, native_int8=True)
        except RuntimeUnavailable as e:
            print(f"{name}: left out ({e})")
            continue
        r.activate()
        for _ in range(3):
            r.infer(x)
        live.append((name, r))
    medians = []
    for rep in range(args.repeats):
        times = {name: [] for name, _ in live}
        for _ in range(args.runs):
            for name, r in live:
                start = time.process_time()
                r.infer(x)
                times[name].append(time.process_time() - start)
        medians.append({n: float(np.median(t)) for n, t in times.items()})
        print(f"repeat {rep}: " + ", ".join(f"{n} {m * 1e3:.1f} ms" for n, m in medians[-1].items()), flush=True)
    base = live[0][0]
    print(f"\n{args.threads} thread(s), LR {h}x{w}, CPU time per inference; ratio vs {base}\n")
    print("| runtime | CPU ms (median over repeats) | ratio (median, range over repeats) |\n|---|---|---|")
    for name, _ in live:
        ms = [m[name] for m in medians]
        ratios = [m[base] / m[name] for m in medians]
        print(f"| {name} | {np.median(ms) * 1e3:.1f} | {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    for _, r in live:
        r.deactivate()


if __name__ == "__main__":
    main()
