"""GPU smoke test for engines/ (needs TensorRT and an NVIDIA GPU; pytest never collects it: not test_*.py).

    pip install -c constraints.txt -e '.[trt]'
    python tests/gpu/smoke.py [--out DIR]

Needs only the package and its [trt] extra (no pytest, no tests/ helpers). On a seeded nano x2 model:
exports fp32 / fp16 ONNX with paragon_export.export_onnx and int8 with our own int8 recipe
(paragon_export.int8.quantize_int8: symmetric per-channel Q/DQ on conv inputs only, float biases; ORT's
plain quantize_static output is rejected by our int8 check and by TensorRT's IDequantizeLayer), builds an
engine from each with `engines.build_engine(..., check=True)` (Polygraphy TrtRunner vs ORT fp32 on real
photos), rebuilds fp32 to show the timing cache at work, checks the manifest's up-to-date path and the
refusal to load on a different GPU, runs the printed trtexec command when trtexec is installed, and times
512x512 inference per engine (median of 50 after warm-up, as a ratio to the fp32 engine), refits a
refittable fp16 engine from its ONNX, and prints one table. Writes
smoke.json. Runs in a few minutes on a recent GPU; exits non-zero if any step fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from paragon_export.engines import (BuildOptions, EngineMismatch, GpuInfo, Target, build_engine, current_target,
                                    load_engine)
from paragon_export.errors import ParagonError

PROFILE = "1x3x64x64:1x3x512x512:2x3x512x512"
TIMED_RUNS = 50


def export_models(work: Path) -> dict[str, Path]:
    """fp32 + fp16 ONNX through paragon_export.export_onnx, int8 through our int8 recipe (SPEC §5)."""
    from paragon_export.checkpoint import save_model
    from paragon_export.export_onnx import export_onnx
    from paragon_export.export_recipe import ExportRecipe
    from paragon_export.int8 import quantize_int8
    from paragon_export.seeded import seeded_model

    ckpt = work / "nano_x2.safetensors"
    save_model(seeded_model("paragonsr2_nano", 2), ckpt, variant="paragonsr2_nano", force=True)
    paths = {k: Path(a.path) for k, a in export_onnx(ckpt, work, ExportRecipe(fp16=True), force=True).items()}
    # peer=False: the deploy script's recipe is a comparison for the int8 report, not something to build
    paths["int8"] = Path(quantize_int8(paths["fp32"], work, peer=False, force=True).path)
    print(f"exported: {', '.join(p.name for p in paths.values())}")
    return paths


def time_engine(path: Path) -> float:
    """Median seconds per 1x3x512x512 inference (outputs left on the GPU), after warm-up."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    x = np.random.default_rng(0).random((1, 3, 512, 512), dtype=np.float32)
    with TrtRunner(EngineFromBytes(path.read_bytes())) as runner:
        for _ in range(5):
            runner.infer({"input": x}, copy_outputs_to_host=False)
        times = []
        for _ in range(TIMED_RUNS):
            runner.infer({"input": x}, copy_outputs_to_host=False)
            times.append(runner.last_inference_time())
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="keep everything here (default: a temp folder)")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="paragon-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    engines_dir = work / "engines"
    results: dict = {"steps": {}, "failures": []}

    def step(name, fn):
        t0 = time.monotonic()
        try:
            value = fn()
            results["steps"][name] = {"ok": True, "seconds": round(time.monotonic() - t0, 2), "value": value}
            print(f"[ok]   {name} ({time.monotonic() - t0:.1f} s)")
            return value
        except Exception as e:  # a smoke run reports every failure, then exits non-zero
            results["steps"][name] = {"ok": False, "seconds": round(time.monotonic() - t0, 2), "error": str(e)}
            results["failures"].append(name)
            print(f"[FAIL] {name}: {e}")
            if not isinstance(e, ParagonError):
                traceback.print_exc()
            return None

    try:
        target = current_target()
    except ParagonError as e:
        print(f"smoke test needs TensorRT and a GPU: {e}")
        return 2
    results["gpu"] = {"name": target.gpu.name, "cc": target.gpu.cc, "source": target.gpu.source}
    results["trt_version"] = target.trt_version
    print(f"GPU {target.gpu.name} (compute {target.gpu.cc}), TensorRT {target.trt_version}, work dir {work}")

    onnx = step("export fp32/fp16/int8 ONNX", lambda: {k: str(v) for k, v in export_models(work).items()})
    if not onnx:
        return 1
    cache = work / "timing.cache"
    built: dict[str, dict] = {}
    for prec in ("fp32", "fp16", "int8"):
        def build(prec=prec):
            art, rep = build_engine(onnx[prec], engines_dir, profile=PROFILE, timing_cache=cache, check=True,
                                    reference=onnx["fp32"], force=True)
            built[prec] = {"path": art.path, "report": rep}
            c = rep.check
            print(f"       {art.path.name}: built in {rep.build_seconds} s, worst PSNR {c.worst_psnr:.2f} dB, "
                  f"worst max abs {c['worst_max_abs']:.2e}")
            print(f"       trtexec: {rep.trtexec}")
            return {"engine": art.path.name, "build_seconds": rep.build_seconds, "worst_psnr": c.worst_psnr,
                    "worst_max_abs": c.worst_max_abs, "thresholds": c.summary()["thresholds"], "trtexec": rep.trtexec}
        step(f"build + check {prec} engine", build)

    def rebuild_with_cache():
        first = results["steps"]["build + check fp32 engine"]["value"]["build_seconds"]
        _, rep = build_engine(onnx["fp32"], engines_dir, profile=PROFILE, timing_cache=cache, force=True)
        print(f"       fp32 build {first} s cold, {rep.build_seconds} s with the timing cache")
        return {"cold_s": first, "warm_s": rep.build_seconds, "cache_bytes": cache.stat().st_size}
    if "fp32" in built:
        step("rebuild fp32 reusing the timing cache", rebuild_with_cache)

    def up_to_date():
        _, rep = build_engine(onnx["fp16"], engines_dir, profile=PROFILE, timing_cache=cache)
        assert rep.status == "up to date", rep.status
        return rep.status
    if "fp16" in built:
        step("second fp16 build is 'up to date'", up_to_date)

    def mismatch():
        path = built["fp32"]["path"]
        data, _ = load_engine(path, target=target)
        other = Target(GpuInfo("NVIDIA Other GPU", (8, 6), None, "fake"), target.trt_version)
        try:
            load_engine(path, target=other)
        except EngineMismatch as e:
            print(f"       refused as expected: {e}")
            return {"bytes": len(data), "message": str(e)}
        raise AssertionError("an engine built here loaded for another GPU")
    if "fp32" in built:
        step("load here, refuse for another GPU", mismatch)

    def ampere_plus():
        art, rep = build_engine(onnx["fp16"], engines_dir, profile="64x64:256x256:256x256", timing_cache=cache,
                                options=BuildOptions(hardware_compat="ampere+"), check=True, reference=onnx["fp32"],
                                force=True)
        return {"engine": art.path.name, "worst_psnr": rep.check.worst_psnr}
    if target.gpu.compute_capability >= (8, 0):
        step("ampere+ fp16 engine", ampere_plus)

    def refit():
        from paragon_export.engines.refit import refit_engine

        art, _ = build_engine(onnx["fp16"], work / "refit", profile=PROFILE, timing_cache=cache,
                              options=BuildOptions(refittable=True), force=True)
        new = refit_engine(art.path, onnx["fp16"], target=target, progress=lambda _m: None)
        return {"engine": art.path.name, "refitted": new.path.name}
    if "fp16" in built:
        step("refit a refittable fp16 engine from its ONNX", refit)

    trtexec = shutil.which("trtexec")
    if trtexec and "fp16" in built:
        def run_trtexec():
            cmd = built["fp16"]["report"].trtexec.replace(str(built["fp16"]["path"]), str(work / "trtexec.engine"))
            r = subprocess.run(cmd + " --skipInference", shell=True, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError((r.stdout + r.stderr).strip().splitlines()[-1])
            return cmd
        step("trtexec accepts the printed command", run_trtexec)
    else:
        results["steps"]["trtexec accepts the printed command"] = {"ok": None, "note": "trtexec not on PATH"}

    timings = {}
    for prec, b in built.items():
        t = step(f"time {prec} 512x512", lambda b=b: time_engine(b["path"]))
        if t:
            timings[prec] = t
    print(f"\n| engine | 512x512 ms (median of {TIMED_RUNS}) | x fp32 | worst PSNR vs ORT fp32 |")
    print("|---|---|---|---|")
    for prec, t in timings.items():
        check = results["steps"].get(f"build + check {prec} engine", {}).get("value") or {}
        ratio = f"{timings['fp32'] / t:.2f}" if "fp32" in timings else "-"
        print(f"| {prec} | {t * 1e3:.2f} | {ratio} | {check.get('worst_psnr', float('nan')):.2f} dB |")
    results["timings_ms"] = {k: round(v * 1e3, 3) for k, v in timings.items()}

    (work / "smoke.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {work / 'smoke.json'}; {len(results['failures'])} failure(s)")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
