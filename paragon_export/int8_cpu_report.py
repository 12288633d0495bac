"""The ORT-CPU int8 step's record (`int8_cpu.cpu_int8`) as typed data: `to_json()` is its
`_report.json`, `line()` the one-line verdict, `summary()` the manifest's flat figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .records import Record, optional


@dataclass(frozen=True)
class CpuRecipe(Record):
    format: str
    activations: str
    weights: str
    reduce_range: bool  # 7-bit weights where u8s8 saturates
    ops: str
    calibration_method: str


@dataclass(frozen=True)
class Thresholds(Record):
    min_speedup: float
    min_psnr: float
    psnr: str = "native kernels vs fp32, worst held-out image"


@dataclass(frozen=True)
class Speed(Record):
    """fp32 vs native int8 CPU time (`int8_cpu.speed_probe`), and which model was timed."""

    timer: str
    threads: int
    input: list[int]
    rounds: int
    fp32_ms: float
    int8_ms: float
    speedup: float
    speedup_min: float
    speedup_max: float
    model: str | None = optional()


@dataclass(frozen=True)
class PsnrFigures(Record):
    """PSNR vs fp32 over the held-out images; None: identical outputs."""

    psnr_mean: float | None
    psnr_min: float | None


@dataclass(frozen=True)
class CpuQuality(Record):
    """`int8_cpu.quality`: through ORT's native kernels on this CPU and through the Q/DQ reference."""

    images: int
    native: PsnrFigures
    reference: PsnrFigures


@dataclass(frozen=True)
class CpuOutput(Record):
    model: str | None  # None: not written
    report: str
    sha256: str | None = optional()


@dataclass(frozen=True)
class CpuInt8Record(Record):
    """What the step measured on this CPU and what it decided."""

    isa: str
    machine: str
    runtime: str
    fp32_onnx: str
    fp32_sha256: str
    recipe: CpuRecipe
    thresholds: Thresholds
    speed: Speed | None = None
    quality: CpuQuality | None = None
    calibration: dict | None = optional()  # only when the full calibration ran
    shipped: bool = False
    reasons: list[str] = field(default_factory=list)
    output: CpuOutput | None = None
    ops: dict[str, int] | None = optional()  # op counts of the written file

    def line(self) -> str:
        """One line: the decision and the figures behind it."""
        sp, q = self.speed, self.quality.native if self.quality else None
        figs = []
        if sp:
            figs.append(f"{sp.speedup:.2f}x fp32 [{sp.speedup_min:.2f}..{sp.speedup_max:.2f}] "
                        f"({sp.rounds} rounds, {sp.input[2]}x{sp.input[3]}, 1 thread, CPU time)")
        if q:
            figs.append(f"PSNR vs fp32 {_db(q.psnr_min)} worst / {_db(q.psnr_mean)} mean (native kernels)")
        head = (f"CPU int8 ({self.isa}, {self.recipe.format}, reduce_range "
                f"{'on' if self.recipe.reduce_range else 'off'}): ")
        verdict = (f"written {Path(self.output.model).name}" if self.shipped
                   else "not written: " + "; ".join(self.reasons))
        return head + verdict + (" -- " + ", ".join(figs) if figs else "")

    def summary(self) -> dict:
        """The decision and figures for a manifest: flat, without the calibration details."""
        sp, q = self.speed, self.quality.native if self.quality else None
        return {"shipped": self.shipped, "reasons": self.reasons, "isa": self.isa, "runtime": self.runtime,
                "format": self.recipe.format, "reduce_range": self.recipe.reduce_range,
                "thresholds": self.thresholds.to_json(),
                **{k: getattr(sp, k) if sp else None for k in ("speedup", "speedup_min", "speedup_max", "rounds", "input")},
                "native_psnr_min": q.psnr_min if q else None, "native_psnr_mean": q.psnr_mean if q else None,
                "line": self.line()}


def _db(v: float | None) -> str:
    return "identical" if v is None else f"{v:.2f} dB"
