"""The INT8 files of a release on OpenVINO CPU: held-out quality (the int8 report's evaluation: PSNR vs the
fp32 ONNX, Y-PSNR drop vs HR) and CPU time vs OpenVINO fp32 (1 thread, one LR size, round-robin, per
round the min of 3 runs, median and spread of the per-round ratio over rounds).

    python benchmarks/openvino_int8.py RELEASE_DIR [--rounds 20] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov

from paragon_export.calibration import build_calibration_set
from paragon_export.cpu import isa
from paragon_export.int8_eval import Evaluator
from paragon_export.int8_recipe import Int8Recipe
from paragon_export.metrics import psnr, psnr_y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("release", type=Path)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    files = {"fp32": next(a.release.glob("*_fp32_op*.onnx")), "int8 (TensorRT)": next(a.release.glob("*_int8_op??.onnx")),
             "int8 (OpenVINO)": next(a.release.glob("*_int8_op*_openvino.onnx"))}
    r = Int8Recipe()
    cal = build_calibration_set(None, scale=2, lr_size=r.lr_size, crops_per_image=r.crops_per_image,
                                batch_size=r.batch_size, seed=r.seed, holdout=r.holdout, eval_size=r.eval_size)
    ev = Evaluator(files["fp32"], cal, 2)
    core = ov.Core()
    cms = {k: core.compile_model(core.read_model(str(p)), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                  "INFERENCE_NUM_THREADS": 1}) for k, p in files.items()}
    print(f"OpenVINO {ov.get_version()} CPU, {isa()}")
    for k, cm in cms.items():
        ps, ys = [], []
        for h, ref in zip(cal.holdout, ev.ref):
            y = cm(np.ascontiguousarray(h.lr.transpose(2, 0, 1)[None]))[0][0].transpose(1, 2, 0)
            ps.append(psnr(np.clip(y, 0, 1), np.clip(ref, 0, 1)))
            ys.append(psnr_y(y, h.hr, 2))
        print(f"{k:16s} PSNR vs fp32 {np.mean(ps):.2f} dB (min {min(ps):.2f}), "
              f"Y-PSNR drop {ev.fp32.mean.y_psnr - np.mean(ys):+.3f} dB")
    x = np.random.default_rng(0).random((1, 3, a.size, a.size), np.float32)
    for cm in cms.values():
        cm(x)
    ratios: dict[str, list[float]] = {k: [] for k in cms}
    for _ in range(a.rounds):
        t = {}
        for k, cm in cms.items():
            runs = []
            for _ in range(3):
                t0 = time.process_time()
                cm(x)
                runs.append(time.process_time() - t0)
            t[k] = min(runs)
        for k in cms:
            ratios[k].append(t[k] / t["fp32"])
    for k, v in ratios.items():
        q1, q3 = np.percentile(v, [25, 75])
        print(f"{k:16s} CPU time vs OpenVINO fp32 at {a.size}²: median {statistics.median(v):.2f} "
              f"(IQR {q1:.2f}-{q3:.2f}, min {min(v):.2f}, max {max(v):.2f}, {len(v)} rounds)")


if __name__ == "__main__":
    main()
