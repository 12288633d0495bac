"""parity_report: the typed result of a parity run. It is what `parity()` returns and what parity.json
holds (`to_json` / `from_json`, schemas/parity.schema.json), and it renders itself as parity.md and
as the per-file runtime verdicts the manifest and the model card carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .records import Record
from .verify import Limits

SCHEMA = "paragon-export/parity"
SCHEMA_VERSION = 1


@dataclass
class CaseResult(Record):
    """One row on one case, against the reference's output. None: no finite value (see `error`/`nonfinite`);
    a None PSNR with a max_abs is bit-identical (infinite PSNR)."""

    image: str
    lr_size: list[int]
    max_abs: float | None = None
    mean_abs: float | None = None
    psnr: float | None = None
    y_psnr: float | None = None
    ssim: float | None = None
    nonfinite: int = 0
    error: str | None = None

    def badness(self) -> float:
        """Larger is worse: a failed or non-finite case first, then the lowest PSNR."""
        if self.nonfinite or self.error:
            return float("inf")
        return -(self.psnr if self.psnr is not None else 1e9)


@dataclass
class Summary(Record):
    cases: int
    max_abs: float | None
    mean_abs: float | None
    min_psnr: float | None  # None with cases compared: bit-identical on every case
    mean_psnr: float | None
    y_psnr: float | None
    y_psnr_delta: float | None
    ssim: float | None
    nonfinite: int
    identical_cases: int


@dataclass
class PolygraphyCheck(Record):
    compare_func: str
    passed: bool
    iterations_passed: int
    iterations: int


@dataclass
class Layer(Record):
    node: str
    op: str
    tensor: str
    rel_err: float | None  # None: NaN/Inf
    prev_max_rel_err: float | None
    jump_ratio: float | None
    module: str | None
    weights: list[str]


@dataclass
class Localization(Record):
    """Where a failing ONNX row departs from the reference (`localize.localize`), on its worst case."""

    method: str  # onnx-reference | torch-hooks | none
    reference: str
    layers_compared: int
    floor: float
    ratio: float
    culprit: Layer | None
    sharp_jump: bool
    note: str
    top: list[Layer]
    case: dict = field(default_factory=dict)  # {"image", "lr_size"}: the input it was measured on

    def line(self) -> str:
        c = self.culprit
        if c is None:
            return f"  - localization: {self.note}"
        weights = f", weights {', '.join(f'`{w}`' for w in c.weights)}" if c.weights else ""
        module = f" (module `{c.module}`{weights})" if c.module else weights
        err = "NaN/Inf" if c.rel_err is None else f"{c.rel_err:.2e}"
        against = (f"passing fp32 ONNX `{Path(self.reference).name}`" if self.method == "onnx-reference"
                   else "the fp32 torch reference (forward hooks)")
        h, w = self.case["lr_size"]
        where = f"{self.layers_compared} tensors compared with {against} on {self.case['image']} {h}x{w}"
        if self.sharp_jump:
            return (f"  - first layer whose error jumps: `{c.node}`{module}: relative error {err}, "
                    f"at most {c.prev_max_rel_err:.1e} before it; {where}")
        return (f"  - no single layer's error jumps {self.ratio:g}x above {self.floor:g} (the error "
                f"builds up); largest increase at `{c.node}`{module}: {err}; {where}")


@dataclass
class Row(Record):
    """One thing run and judged: the reference, a derived torch model, an artifact or an artifact on
    another runtime (role), with its verdict (status, reasons) and figures."""

    name: str
    role: str  # reference | derived | artifact | runtime
    kind: str  # torch | checkpoint | onnx | engine | ncnn
    path: str | None
    sha256: str | None
    runner: str
    precision: str
    precision_source: str
    gated: bool
    status: str  # reference | pass | fail | error | skipped | info
    reasons: list[str]
    note: str
    limits: Limits | None
    summary: Summary | None
    polygraphy: PolygraphyCheck | None
    results: list[CaseResult]
    localization: Localization | None

    def table_line(self) -> str:
        result = {"reference": "ref", "pass": "PASS", "fail": "**FAIL**", "error": "**ERROR**",
                  "skipped": "skipped", "info": "info"}[self.status]
        s, lim = self.summary, self.limits
        if s is None:
            cells = ["–"] * 5
        else:
            max_abs = _fmt(s.max_abs, ".2e")
            psnr_txt = "identical" if s.identical_cases == s.cases else _fmt(s.min_psnr, ".1f")
            if self.role == "reference":
                max_abs, psnr_txt = "–", "–"
            if lim:
                max_abs += f" ({lim.max_abs:g})"
                psnr_txt += f" ({lim.min_psnr:g})"
            delta = "" if s.y_psnr_delta is None or self.role == "reference" else f" ({s.y_psnr_delta:+.2f})"
            cells = [max_abs, psnr_txt, _fmt(s.y_psnr, ".2f") + delta, _fmt(s.ssim, ".4f"), str(s.nonfinite)]
        return f"| {result} | {self.name} | {self.runner} | {self.precision} | " + " | ".join(cells) + " |"

    def notes(self) -> list[str]:
        """The lines under the table: why this row failed, was skipped or is not gated, and where
        localization puts the error."""
        notes = []
        if self.status in ("fail", "error", "skipped") or (self.status == "info" and self.reasons):
            notes.append(f"- **{self.name}** ({self.status}): " + "; ".join(self.reasons))
        elif self.status == "info":
            notes.append(f"- {self.name}: not gated, {self.note}")
        if self.localization:
            notes.append(self.localization.line())
        return notes


@dataclass
class Reference(Record):
    path: str
    sha256: str
    variant: str
    scale: int
    upsampler: str
    fused: bool
    runner: str


@dataclass
class CaseInfo(Record):
    """One LR crop: what bicubic and the reference reach against its HR crop (None: identical, x1)."""

    image: str
    lr_size: list[int]
    bicubic_y_psnr: float | None
    bicubic_ssim: float
    reference_y_psnr: float | None
    reference_ssim: float


@dataclass
class ReferenceQuality(Record):
    """The fp32 reference and bicubic against the HR crops, averaged over the cases (None: identical, x1)."""

    y_psnr: float | None
    ssim: float
    bicubic_y_psnr: float | None
    bicubic_ssim: float


@dataclass
class Outputs(Record):
    """The report folder's files, relative to it."""

    json: str = "parity.json"
    markdown: str = "parity.md"
    pngs: list[str] = field(default_factory=list)


@dataclass
class ParityReport(Record):
    created_utc: str
    passed: bool  # every gated row passed (skipped ones do not count)
    tool_versions: dict[str, str | None]
    reference: Reference
    images: list[dict]  # {"name", "path"}
    image_source: str
    sizes: list[list[int]]
    thresholds: dict[str, Limits]
    overrides: dict  # {"atol", "min_psnr"}: the user's overrides of the limits table, None where not given
    reference_quality: ReferenceQuality
    cases: list[CaseInfo]
    artifacts: list[Row]
    notes: list[str] = field(default_factory=list)
    outputs: Outputs = field(default_factory=Outputs)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **super().to_json()}

    def markdown(self) -> str:
        r, q = self.reference, self.reference_quality
        compat_fail = [a for a in self.artifacts if a.role == "runtime" and a.status in ("fail", "error") and not a.gated]
        more = f" (runtime compatibility: {len(compat_fail)} row(s) FAIL, see below)" if compat_fail else ""
        lines = [
            f"# Parity: {'PASS' if self.passed else 'FAIL'}{more}",
            "",
            f"Reference: `{Path(r.path).name}` ({r.variant} x{r.scale}, {r.upsampler}, {r.runner}), "
            f"sha256 `{r.sha256[:12]}`",
            f"Images: {', '.join(i['name'] for i in self.images)} ({self.image_source}) at LR "
            f"{', '.join(f'{h}x{w}' for h, w in self.sizes)}: {len(self.cases)} cases. "
            f"Ground truth (HR): reference Y-PSNR {_db(q.y_psnr)} / SSIM {q.ssim:.4f}; "
            f"bicubic {_db(q.bicubic_y_psnr)} / {q.bicubic_ssim:.4f}"
            + (" (at x1 bicubic is the identity: LR = HR)." if r.scale == 1 else "."),
            "",
            "| result | artifact | runner | precision | max abs (limit) | min PSNR dB (limit) | Y-PSNR dB (Δ ref) | SSIM | NaN/Inf |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [a.table_line() for a in self.artifacts]
        notes = [n for a in self.artifacts for n in a.notes()]
        if notes:
            lines += ["", *notes]
        lines += self.verified_on()
        pngs = self.outputs.pngs
        if pngs:
            lines += ["", "Crops (LR bicubic | reference | each artifact; row 2: |diff| heat maps, white = at the "
                      "artifact's max-abs limit): " + ", ".join(f"[{Path(p).name}]({p})" for p in pngs)]
        lines += ["", "Tools: " + ", ".join(f"{k} {v}" for k, v in self.tool_versions.items() if v), ""]
        return "\n".join(lines)

    def verified_on(self) -> list[str]:
        """Per file, the runtimes it passed and failed on: what a user who picks a runtime reads."""
        by_path: dict[str, list[Row]] = {}
        for a in self.artifacts:
            if a.role in ("artifact", "runtime") and a.path:
                by_path.setdefault(a.path, []).append(a)
        if not any(len(rows) > 1 for rows in by_path.values()):
            return []
        lines = ["", "Runtimes each file is verified on (gated rows decide the result above; the others are "
                 "compatibility rows with the same limits):", ""]
        for path, rows in by_path.items():
            parts = []
            for a in rows:
                s = a.summary
                fig = f", {s.min_psnr:.1f} dB" if a.status == "fail" and s and s.min_psnr is not None else ""
                parts.append(f"{a.runner} {a.status.upper()}{fig}" + ("" if a.gated else " (not gated)"))
            lines.append(f"- `{Path(path).name}`: " + ", ".join(parts))
        return lines

    def runtime_verdicts(self) -> dict:
        """Per file name: the runtimes whose row passed (verified), and every other judged or skipped
        row with its status and reasons (not verified). Info rows (ungated diagnostics) are neither.
        Plain data: the manifest stores it and the model card is written from it (`card_lines`)."""
        out: dict = {}
        for a in self.artifacts:
            if a.role not in ("artifact", "runtime") or not a.path:
                continue
            v = out.setdefault(Path(a.path).name, {"precision": a.precision, "verified": [], "not_verified": []})
            if a.status == "pass":
                v["verified"].append(a.runner)
            elif a.status in ("fail", "error", "skipped"):
                v["not_verified"].append({"runner": a.runner, "status": a.status, "reasons": a.reasons})
        return out


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def _db(v: float | None) -> str:
    # None = infinite PSNR: identical to the ground truth (bicubic at x1, where LR is the HR crop)
    return "identical (inf dB)" if v is None else f"{v:.2f} dB"


def card_lines(verdicts: dict) -> list[str]:
    """The model card's runtime section from the manifest's stored verdicts (`ParityReport.runtime_verdicts`):
    exactly the passing rows as verified, the rest as not."""
    lines = ["## Runtimes", "", "A file is verified on the runtimes whose parity row passed, and on no other:", ""]
    for name, v in sorted(verdicts.items()):  # the manifest stores keys sorted: one order either way
        text = f"- `{name}` ({v['precision']}): verified on " + (", ".join(v["verified"]) or "no runtime")
        for n in v["not_verified"]:
            what = "not tested" if n["status"] == "skipped" else "**not verified**"
            text += f"; {what} on {n['runner']} ({n['status'].upper()}: {'; '.join(n['reasons'])})"
        lines.append(text)
    return lines
