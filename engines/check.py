"""`--check`: run an engine through Polygraphy's TensorRT runner and the fp32 ONNX through ONNX Runtime
(`runners.open_runner`) on real photos, and compare; the result is an `EngineCheck`.

The comparison loop takes any two Polygraphy runners, so it is exercised on CPU with ORT on both sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from paragon_export.errors import ParagonError
from paragon_export.images import lr_hr_crops, sample_photo_paths
from paragon_export.records import Record
from paragon_export import verify
from paragon_export.verify import LIMITS, VERIFY_SIZES, Limits

from .identity import BuildOptions
from .onnx_info import OnnxInfo, inspect_onnx
from .profile import Profile

_MATCH_KEYS = ("variant", "scale", "upsampler")


@dataclass
class CheckRow:
    """One input's engine output against the fp32 ONNX's; the fields are the JSON row's, in its order."""

    input: str
    max_abs: float | None  # None: the shapes differ, nothing was compared
    mean_abs: float | None
    psnr: float | None
    finite: bool
    passed: bool
    why: str

    def text(self) -> str:
        if self.max_abs is None:
            return f"  {self.input:<28} FAIL {self.why}"
        return (f"  {self.input:<28} max abs {self.max_abs:.2e}  mean abs {self.mean_abs:.2e}  "
                f"PSNR {self.psnr:.2f} dB  {'ok' if self.passed else 'FAIL ' + self.why}")


@dataclass
class EngineCheck(Record):
    """The --check result: every row against the limits `paragon-export parity` applies (verify.LIMITS),
    so a checked engine passes parity. fp32 engines are built with TF32 off to meet them."""

    precision: str
    reference: str  # the fp32 ONNX's path
    scale: int
    rows: list[CheckRow]

    @property
    def limits(self) -> Limits:
        return LIMITS[self.precision]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def worst_psnr(self) -> float | None:
        return min((r.psnr for r in self.rows if r.psnr is not None), default=None)

    @property
    def worst_max_abs(self) -> float | None:
        return max((r.max_abs for r in self.rows if r.max_abs is not None), default=None)

    def summary(self) -> dict:
        """What the engine's manifest entry records of its check."""
        return {"passed": self.passed, "worst_psnr": self.worst_psnr, "worst_max_abs": self.worst_max_abs,
                "reference": self.reference, "thresholds": asdict(self.limits)}

    def to_json(self) -> dict:
        return {"precision": self.precision, "reference": self.reference, "thresholds": asdict(self.limits),
                "scale": self.scale, "rows": [asdict(r) for r in self.rows], "passed": self.passed,
                "worst_psnr": self.worst_psnr, "worst_max_abs": self.worst_max_abs}

    def worst(self) -> str:
        """The first failing row, for the one-line error of a failed check."""
        bad = next((r for r in self.rows if not r.passed), None)
        return f"{bad.input}: {bad.why}" if bad else "no rows"

    def text(self) -> str:
        lim = f"PSNR >= {self.limits.min_psnr} dB" + (f", max abs <= {self.limits.max_abs:g}"
                                                      if self.limits.max_abs else "")
        head = f"check vs {Path(self.reference).name} on ORT CPU ({self.precision}: {lim})"
        return "\n".join([head, *(r.text() for r in self.rows)])


def find_reference(model: OnnxInfo, reference: Path | str | None = None) -> OnnxInfo:
    """The fp32 ONNX to compare against: given, the model itself, or its unique fp32 sibling."""
    if reference is not None:
        ref = inspect_onnx(reference)
        if ref.precision != "fp32":
            raise ParagonError(f"--reference {ref.path.name} is {ref.precision}; the check compares against fp32")
        return ref
    if model.precision == "fp32":
        return model
    found = []
    for p in sorted(model.path.parent.glob("*.onnx")):
        if p.resolve() == model.path:
            continue
        try:
            cand = inspect_onnx(p)
        except ParagonError:
            continue
        if cand.precision == "fp32" and all(cand.meta.get(k) == model.meta.get(k) for k in _MATCH_KEYS):
            found.append(cand)
    if len(found) != 1:
        why = "none" if not found else f"{len(found)} candidates"
        raise ParagonError(f"--check of a {model.precision} model compares against its fp32 ONNX, and "
                           f"{model.path.parent} has {why}: pass --reference FP32.onnx")
    return found[0]


def verdict_row(name: str, out: np.ndarray, ref: np.ndarray, precision: str) -> CheckRow:
    """The engine's output for input `name` against the fp32 ONNX's, with the verdict."""
    c = verify.compare(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    fails = c.failures(LIMITS[precision])
    if c.shape_mismatch:
        return CheckRow(name, None, None, None, finite=True, passed=False, why=fails[0])
    return CheckRow(name, c.max_abs, c.mean_abs, c.psnr, finite=not c.nonfinite, passed=not fails,
                    why="; ".join(fails))


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def check_inputs(profile: Profile, scale: int, *, sizes=VERIFY_SIZES) -> list[tuple[str, np.ndarray]]:
    """Real LR photo crops (bicubic from the held-out photos) at sizes inside the profile, as NCHW batches."""
    lo, hi = profile.min, profile.max
    wanted = []
    for h, w in sizes:
        hw = (_clamp(h, lo[2], hi[2]), _clamp(w, lo[3], hi[3]))
        if hw not in wanted:
            wanted.append(hw)
    batches = []
    for h, w in wanted:
        try:
            crops = lr_hr_crops(sample_photo_paths("eval"), scale, (h, w))
        except ParagonError:
            continue  # larger than the bundled photos at this scale
        arrays = [np.ascontiguousarray(lr.transpose(2, 0, 1)[None], np.float32) for _, lr, _ in crops]
        n = lo[0]
        for i, (name, _, _) in enumerate(crops):
            group = [arrays[(i + j) % len(arrays)] for j in range(n)]
            batches.append((f"{name} {h}x{w} n{n}", np.concatenate(group)))
        if hi[0] >= 2 and n < 2:
            batches.append((f"batch of 2 {h}x{w}", np.concatenate([arrays[0], arrays[-1]])))
    if not batches:
        raise ParagonError(f"profile {profile} admits no LR size the bundled photos can supply at x{scale}")
    return batches


def _scale_of(runner, info: OnnxInfo) -> int:
    if info.meta.get("scale", "").isdigit():
        return int(info.meta["scale"])
    h, w = info.min_hw
    x = np.zeros((1, 3, max(h, 8), max(w, 8)), np.float32)
    out = runner.infer({info.input_name: x})[info.output_name]
    return int(out.shape[2]) // x.shape[2]


def run_check(runner, model: OnnxInfo, ref_runner, ref: OnnxInfo, profile: Profile, precision: str) -> EngineCheck:
    """Compare `runner` (the engine) with `ref_runner` (fp32 ONNX on ORT) on real photos. Runners active."""
    scale = _scale_of(ref_runner, ref)
    in_dtype = np.float16 if model.input_dtype == "float16" else np.float32
    rows = []
    for name, x in check_inputs(profile, scale):
        expected = np.array(ref_runner.infer({ref.input_name: x})[ref.output_name], np.float32)
        got = np.array(runner.infer({model.input_name: x.astype(in_dtype)})[model.output_name], np.float32)
        rows.append(verdict_row(name, got, expected, precision))
    return EngineCheck(precision, str(ref.path), scale, rows)


def check_engine(engine_bytes: bytes, model: OnnxInfo, profile: Profile, *,
                 reference: Path | str | None = None, options: BuildOptions = BuildOptions()) -> EngineCheck:
    """Polygraphy TrtRunner on the engine vs the fp32 ONNX on ONNX Runtime (needs TensorRT and a GPU).
    The plan is loaded by `builder.deserialize` (lean runtime, weights of a stripped plan)."""
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.logger import G_LOGGER

    from paragon_export.runners import open_runner

    from .builder import deserialize
    from .trt import require_tensorrt

    ref = find_reference(model, reference)
    engine = deserialize(require_tensorrt(), engine_bytes, options, model.path)
    # The plan is not written yet (a failed check writes nothing), so its runner is made from the bytes;
    # the reference opens like any ONNX artifact, on ONNX Runtime's CPU provider.
    with G_LOGGER.verbosity(G_LOGGER.WARNING), TrtRunner(engine) as engine_runner, \
            open_runner(ref.path, "onnxruntime", name="reference") as ref_runner:
        return run_check(engine_runner, model, ref_runner, ref, profile, model.precision)
