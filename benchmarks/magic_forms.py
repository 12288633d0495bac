"""Which form of the Magic upsampler's fixed-tap resampler to export: measured, whole model.

Forms (all the same arithmetic as the stride-s depthwise ConvTranspose, checked to <= 1e-6):
- `transpose` (arch default): the stride-s depthwise ConvTranspose.
- `polyphase` (arch `form="polyphase"`): one depthwise Conv on the LR grid with s*s outputs per
  channel + a stride-s ConvTranspose with one-hot s x s kernels as the interleave.
- `d2s`: the same polyphase Conv + DepthToSpace (CRD).
- `perphase`: the s*s phases of that Conv split apart (= s*s per-phase depthwise Convs) and interleaved
  with plain Split/Unsqueeze/Concat/Reshape.

Each form's fused model is exported through the product path (`export_model`: TorchScript, onnxsim,
verified on ORT), then timed at one LR size and thread count on ORT CPU, OpenVINO CPU (when
`openvino` imports) and torch eager (fused model in that form; plus the unfused checkpoint with
today's form as the baseline). Timing: every session is built and warmed up first, then runs go
round-robin, `--rounds` rounds of `--runs` runs; per round the median CPU time of one run
(time.process_time: the machine is shared, wall time is noise), ratios taken within each round,
reported as the median over rounds with min..max.

    .venv/bin/python benchmarks/magic_forms.py --size 256x256 --threads 1 --json out/magic_forms.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from paragon_export.arch.magic import MagicUpsampler, polyphase_taps
from paragon_export.bench import bench_input
from paragon_export.checkpoint import load_model
from paragon_export.defaults import default_checkpoint
from paragon_export.export_onnx import export_model
from paragon_export.onnx_graph import ort_session

FORMS = ("transpose", "polyphase", "d2s", "perphase")


def _phase_conv(up: MagicUpsampler, x: torch.Tensor, box: bool, padding: int) -> torch.Tensor:
    """The polyphase Conv alone: (N, C*s*s, H, W), channel c*s*s + a*s + b = phase (a, b)."""
    s, c = up.scale, x.shape[1]
    v, h = up.resample_conv.taps_1d(s, box)
    pv, lo, hi = polyphase_taps(v, s, padding)
    ph, _, _ = polyphase_taps(h, s, padding)
    w = (pv[:, :, None, :, None] * ph[:, None, :, None, :]).flatten(0, 2).unsqueeze(1)  # static traced shape
    return F.conv2d(F.pad(x, (lo, hi, lo, hi)), w, groups=c)


class _Candidate(MagicUpsampler):
    """MagicUpsampler whose resampling uses one of the candidate forms of this script."""

    candidate = "perphase"

    def _resample(self, x: torch.Tensor, *, box: bool, padding: int) -> torch.Tensor:
        s, c = self.scale, x.shape[1]
        y = _phase_conv(self, x, box, padding)
        if self.candidate == "d2s":
            return F.pixel_shuffle(y, s)  # exported as DepthToSpace, mode CRD
        # per-phase: split into s*s depthwise outputs, interleave columns then rows (no Transpose)
        n_, _, hh, ww = y.shape
        phases = y.reshape(n_, c, s * s, hh, ww).unbind(2)
        rows = [torch.stack(phases[a * s:(a + 1) * s], dim=-1).flatten(-2) for a in range(s)]
        return torch.stack(rows, dim=3).flatten(2, 3)


def form_model(fused: torch.nn.Module, form: str) -> torch.nn.Module:
    m = copy.deepcopy(fused)
    up = m.magic_upsampler
    if form in ("transpose", "polyphase"):
        up.form = form
    else:
        up.__class__ = _Candidate
        up.candidate = form
    return m.eval()


def _openvino(path: Path, threads: int):
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(str(path), "CPU", cfg)
    req = compiled.create_infer_request()
    return lambda x: req.infer({0: x})


def runners(loaded, forms, work: Path, threads: int, x: np.ndarray) -> tuple[dict, dict]:
    """name -> callable(x), and per-form export facts (ops, max abs vs today's form)."""
    fused = loaded.model.fuse_for_release().eval()
    ref = form_model(fused, "transpose")
    xt = torch.from_numpy(x)
    with torch.no_grad():
        want = ref(xt)
    out = {"eager unfused (transpose)": lambda a, m=form_model(loaded.model, "transpose"): m(torch.from_numpy(a))}
    facts = {}
    for form in forms:
        m = form_model(fused, form)
        with torch.no_grad():
            err = float((m(xt) - want).abs().max())
        art = export_model(m, work / f"{form}.onnx", meta={"scale": str(loaded.scale)})
        magic = {k: v for k, v in art.meta["nodes_after"].items()}
        facts[form] = {"eager_max_abs_vs_transpose": err, "onnx_ops": magic}
        sess = ort_session(art.path, threads=threads)
        out[f"ort {form}"] = lambda a, s=sess: s.run(None, {"input": a})
        ov = _openvino(art.path, threads)
        if ov is not None:
            out[f"openvino {form}"] = ov
        out[f"eager fused {form}"] = lambda a, mm=m: mm(torch.from_numpy(a))
    return out, facts


def measure(fns: dict, x: np.ndarray, rounds: int, runs: int, warmup: int) -> dict[str, list[float]]:
    """Per round and runner: the median CPU seconds of one run (round-robin within a round)."""
    with torch.no_grad():
        for f in fns.values():
            for _ in range(warmup):
                f(x)
        per_round = {k: [] for k in fns}
        for _ in range(rounds):
            times = {k: [] for k in fns}
            for _ in range(runs):
                for k, f in fns.items():
                    t = time.process_time()
                    f(x)
                    times[k].append(time.process_time() - t)
            for k, v in times.items():
                per_round[k].append(statistics.median(v))
    return per_round


def ratios(per_round: dict, base: str) -> dict[str, dict]:
    out = {}
    for k, v in per_round.items():
        r = [b / t for b, t in zip(per_round[base], v)]
        out[k] = {"median_ms": statistics.median(v) * 1e3, "speedup": statistics.median(r),
                  "min": min(r), "max": max(r)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the embedded trained nano x2")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    h, w = (int(v) for v in a.size.lower().split("x"))
    x = bench_input(h, w).astype(np.float32)
    loaded = load_model(a.checkpoint or default_checkpoint())
    with tempfile.TemporaryDirectory() as d:
        fns, facts = runners(loaded, a.forms.split(","), Path(d), a.threads, x)
        per_round = measure(fns, x, a.rounds, a.runs, a.warmup)
    vs_eager = ratios(per_round, "eager unfused (transpose)")
    report = {"checkpoint": str(a.checkpoint or "embedded default"), "variant": loaded.variant,
              "scale": loaded.scale, "upsampler": loaded.upsampler, "size": a.size, "threads": a.threads,
              "rounds": a.rounds, "runs_per_round": a.runs, "timer": "time.process_time", "forms": facts,
              "vs_eager_unfused": vs_eager, "vs_same_runtime_transpose": {}}
    print(f"{loaded.variant} x{loaded.scale} {loaded.upsampler}, {a.size}, {a.threads} thread(s), "
          f"{a.rounds} rounds x {a.runs} runs, CPU time; speed-up = median over rounds [min..max]")
    print("| runner | median ms | vs eager unfused | vs same runtime, transpose form |\n|---|---|---|---|")
    for k, v in vs_eager.items():
        rt = k.rsplit(" ", 1)[0]
        same = f"{rt} transpose"
        rel = ratios(per_round, same)[k] if same in per_round and same != k else None
        report["vs_same_runtime_transpose"][k] = rel
        rel_s = f"{rel['speedup']:.3f}x [{rel['min']:.3f}..{rel['max']:.3f}]" if rel else "-"
        print(f"| {k} | {v['median_ms']:.1f} | {v['speedup']:.2f}x [{v['min']:.2f}..{v['max']:.2f}] | {rel_s} |")
    for form, f in facts.items():
        print(f"{form}: max abs vs transpose (eager) {f['eager_max_abs_vs_transpose']:.2e}; ops {f['onnx_ops']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
