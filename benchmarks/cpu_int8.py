"""The CPU int8 recipe's choices, measured: QDQ vs QOperator, reduce_range on/off, every op vs Conv only.

For each variant's FP32 ONNX (nano: the embedded trained default; other variants: the fitted stand-in
of `onnx_export.py`, exported through `export_onnx`), every configuration is quantized with ONNX
Runtime's `quantize_static` (uint8 activations, per-channel int8 weights) on ranges from the project's
calibration set and cache (`paragon_export.calibration`, `--method`), then:
- PSNR vs fp32 on the held-out photos (mean and worst), through ORT's native kernels on this CPU and
  through the Q/DQ reference semantics (QOperator files have no reference semantics: both run native);
- speed-up over ORT fp32: CPU time (time.process_time), one thread, a real photo crop at `--size`,
  one run of every model per round in alternating order, the ratio per round, median [min..max].

    .venv/bin/python benchmarks/cpu_int8.py --variants paragonsr2_nano,paragonsr2_s --size 256x256 \\
        --rounds 5 --json out/cpu_int8.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paragon_export.bench import bench_input  # noqa: E402
from paragon_export.calibration import build_calibration_set  # noqa: E402
from paragon_export.calibration.ranges import calibration_ranges  # noqa: E402
from paragon_export.cpu import isa  # noqa: E402
from paragon_export.int8_check import quiet_quantizer  # noqa: E402
from paragon_export.int8_cpu import quality  # noqa: E402
from paragon_export.int8_eval import run, session  # noqa: E402
from paragon_export.onnx_graph import op_counts  # noqa: E402

CONFIGS = ("qdq:rr:all", "qoperator:rr:all", "qdq:rr:conv", "qdq:full:all")
OPS = {"all": None, "conv": ["Conv"]}


def fp32_onnx(variant: str, work: Path, fit_steps: int) -> Path:
    from paragon_export.checkpoint import save_model
    from paragon_export.defaults import default_checkpoint
    from paragon_export.export_onnx import export_onnx

    if variant == "paragonsr2_nano":
        return export_onnx(default_checkpoint(), work, force=True)["fp32"].path
    from onnx_export import fitted_model

    model, _ = fitted_model(variant, 2, "mks2021", fit_steps)
    ckpt = save_model(model, work / f"{variant}.safetensors", variant=variant, force=True)
    return export_onnx(ckpt.path, work, force=True)["fp32"].path


def quantize(fp32: Path, out: Path, ranges, config: str) -> Path:
    fmt, rr, ops = config.split(":")
    with quiet_quantizer():
        quantize_static(str(fp32), str(out), None, quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        op_types_to_quantize=OPS[ops], per_channel=True, reduce_range=rr == "rr",
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=ranges.ort_method, calibration_cache_path=str(ranges.cache_path))
    return out


def speed(models: dict[str, Path], x: np.ndarray, rounds: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in models}
    with contextlib.ExitStack() as stack:
        sessions = {k: stack.enter_context(session(p, 1, native_int8=True)) for k, p in models.items()}
        for s in sessions.values():
            run(s, x)
        for r in range(rounds):
            for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                t = time.process_time()
                run(sessions[k], x)
                times[k].append(time.process_time() - t)
    out = {}
    for k, v in times.items():
        ratio = [f / t for f, t in zip(times["fp32"], v)]
        out[k] = {"median_ms": statistics.median(v) * 1e3, "speedup": statistics.median(ratio),
                  "min": min(ratio), "max": max(ratio)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="paragonsr2_nano,paragonsr2_s")
    ap.add_argument("--onnx", type=Path, action="append", default=[], help="an FP32 ONNX instead of --variants")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="format:rr|full:all|conv, comma-separated")
    ap.add_argument("--method", default="percentile")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fit-steps", type=int, default=150)
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    h, w = (int(v) for v in a.size.lower().split("x"))
    x = bench_input(h, w).astype(np.float32)
    report = {"isa": isa(), "size": a.size, "threads": 1, "rounds": a.rounds, "timer": "time.process_time",
              "method": a.method, "models": {}}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        sources = a.onnx or [fp32_onnx(v, work / v, a.fit_steps) for v in a.variants.split(",")]
        for fp32 in sources:
            calib = build_calibration_set(None, scale=2)
            ranges = calibration_ranges(fp32, calib, a.method, cache_dir=a.cache_dir)
            models = {"fp32": fp32}
            rows = {}
            for c in a.configs.split(","):
                models[c] = quantize(fp32, work / f"{fp32.stem}_{c.replace(':', '_')}.onnx", ranges, c)
                rows[c] = {"quality": quality(fp32, models[c], [hh.lr for hh in calib.holdout]).to_json(),
                           "ops": op_counts(onnx.load(str(models[c])))}
            for k, v in speed(models, x, a.rounds).items():
                rows.setdefault(k, {})["speed"] = v
            report["models"][fp32.name] = rows
            _print(fp32.name, rows, report)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))
    return 0


def _print(name: str, rows: dict, report: dict) -> None:
    print(f"\n{name}: {report['isa']}, {report['size']}, 1 thread, {report['rounds']} rounds, CPU time, "
          f"ranges {report['method']}")
    print("| config | median ms | speed-up vs fp32 [min..max] | PSNR native mean / worst | reference mean / worst |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        s, q = r["speed"], r.get("quality")
        qn = f"{q['native']['psnr_mean']:.2f} / {q['native']['psnr_min']:.2f}" if q else "-"
        qr = f"{q['reference']['psnr_mean']:.2f} / {q['reference']['psnr_min']:.2f}" if q else "-"
        print(f"| {k} | {s['median_ms']:.1f} | {s['speedup']:.2f} [{s['min']:.2f}..{s['max']:.2f}] | {qn} | {qr} |")


if __name__ == "__main__":
    sys.exit(main())
