"""The int8 step's report as typed data: `quantize_int8` builds an `Int8Report`, its readers use
attributes, `to_json()` gives the JSON written beside the model (the keys, order and values the
`_report.json` files have always had) and `table()` renders it for the terminal.

Sub-records nobody reads field by field (the calibration summary, the recipe summary, the ranking,
the native-kernel check) stay plain dicts; mappings keyed by data (dtype -> MAC share, model -> ms)
stay dicts too. The held-out `Quality`, `Latency` and `Output` are the QAT report's as well."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .int8_eval import Latency, NativeKernels, Quality
from .records import Record, optional


@dataclass(frozen=True)
class Qualities(Record):
    fp32: Quality
    int8: Quality


@dataclass(frozen=True)
class Checks(Record):
    """`int8_check.brief(inspect_qdq(...))`: the Q/DQ structure TensorRT's explicit quantization needs."""

    opset: int
    q_nodes: int
    dq_nodes: int
    zero_point_types: list[str]
    zero_points_all_zero: bool
    bad_zero_points: list[str]
    weights_per_channel: bool
    per_tensor_weights: list[str]
    int32_bias_dq: int
    float_nodes: list[str]
    op_counts: dict[str, int]
    foreign_domains: list[str]
    quantized_nodes: int  # last: `brief` replaces the node list with its length



@dataclass(frozen=True)
class Step(Record):
    """One step of the mixed-precision search: the float set tried and its held-out figures."""

    kept_float: list[str]
    added: str | None
    psnr_vs_fp32: float
    y_psnr: float | None
    ssim: float | None
    y_psnr_drop: float | None
    kept: bool | None = optional()  # absent on step 0 and the bias-correction baseline

    def line(self, i: int) -> str:
        drop = f", Y-PSNR drop {self.y_psnr_drop:+.3f} dB" if self.y_psnr_drop is not None else ""
        what = f"+ float {self.added}" if self.added else "all quantized"
        back = "  (no gain: back to int8)" if self.kept is False else ""
        return f"  step {i}: {what}: PSNR vs fp32 {self.psnr_vs_fp32:.2f} dB{drop}{back}"


@dataclass(frozen=True)
class BiasCorrection(Record):
    enabled: bool
    without: Step | None = optional()  # step 0's figures without the correction
    nodes: int | None = optional()



@dataclass(frozen=True)
class RemainderSummary(Record):
    dtype: str  # of the nodes left unquantized
    kept_fp32: dict[str, str]  # node -> why the overflow guard kept it fp32


@dataclass(frozen=True)
class MixedPrecision(Record):
    """The search (`int8_search.mixed_precision`, or its cached replay) and the shipped model's MAC split."""

    target_psnr: float | None
    max_drop: float | None
    node_budget: int
    quantizable_nodes: int
    float_fixed: list[str]
    trt_excluded: dict[str, str]
    bias_correction: BiasCorrection
    met: bool
    kept_float: list[str]
    float_mac_share: float
    steps: list[Step]
    ranking: list[dict]
    seconds: float
    model_sha256: str | None = optional()  # only on a replay: the cached model's
    # Set by the int8 step for every report (defaults only because the optional key above precedes them).
    search_cache: str = "miss"
    mac_share: dict[str, float] = field(default_factory=dict)  # dtype -> share of conv MACs
    remainder: RemainderSummary | None = None

    def lines(self) -> list[str]:
        """The goal and whether it was met, the MAC split, the bias correction and every step."""
        goal = " and ".join(s for s in (
            f"PSNR vs fp32 >= {self.target_psnr} dB" if self.target_psnr is not None else "",
            f"Y-PSNR drop <= {self.max_drop} dB" if self.max_drop is not None else "") if s)
        out = [f"mixed precision ({goal or 'no target'}; budget {self.node_budget} of {self.quantizable_nodes} "
               f"nodes): {'met' if self.met else 'NOT met'}"]
        sh, rest = self.mac_share, self.remainder
        if sh and rest is not None:
            kept = f"; kept fp32 by the overflow guard: {', '.join(rest.kept_fp32)})" if rest.kept_fp32 else ")"
            out.append(f"conv MACs: int8 {100 * sh['int8']:.1f}%, fp16 {100 * sh['fp16']:.1f}%, "
                       f"fp32 {100 * sh['fp32']:.1f}% (remainder {rest.dtype}{kept}")
        bc = self.bias_correction
        if bc.enabled and bc.without is not None:
            w = bc.without
            drop = f", Y-PSNR drop {w.y_psnr_drop:+.3f} dB" if w.y_psnr_drop is not None else ""
            out.append(f"  bias correction on {bc.nodes} nodes; without it step 0 would be: "
                       f"PSNR vs fp32 {w.psnr_vs_fp32:.2f} dB{drop}")
        return out + [st.line(i) for i, st in enumerate(self.steps)]


@dataclass(frozen=True)
class PeerRow(Record):
    """A comparison recipe on the same model and crops (`int8_compare`), or why it was skipped."""

    skipped: str | None = optional()
    recipe: str | None = optional()
    remainder: str | None = optional()
    excluded_nodes: list[str] | None = optional()
    trt_compatible: bool | None = optional()
    trt_blockers: list[str] | None = optional()
    quality: Quality | None = optional()
    checks: Checks | None = optional()
    mac_share: dict[str, float] | None = optional()

    def note(self, key: str) -> str | None:
        if self.skipped:
            return f"{key} row skipped: {self.skipped}"
        if self.trt_blockers:
            return f"{key} recipe is not TensorRT-compatible: {'; '.join(self.trt_blockers)}"
        return None


@dataclass(frozen=True)
class ModelInfo(Record):
    source: str
    fp32_onnx: str
    fp32_sha256: str
    scale: int


@dataclass(frozen=True)
class Output(Record):
    model: str
    sha256: str
    report: str


PEER_LABELS = {"peer": "original: QUInt8 asym, ORT entropy", "modelopt": "NVIDIA ModelOpt ONNX PTQ"}


@dataclass(frozen=True)
class Int8Report(Record):
    """What `quantize_int8` made and measured; `to_json()` is its `_report.json`."""

    model: ModelInfo
    calibration: dict  # calibration set and ranges summary (`CalibrationSet.summary`, `Ranges.summary`)
    recipe: dict  # the recipe as written (`int8._recipe_summary`)
    checks: Checks
    mixed_precision: MixedPrecision
    quality: Qualities
    latency: Latency
    native_kernels: NativeKernels | None  # ORT's native integer kernels vs the Q/DQ reference
    peer: PeerRow | None  # None: comparisons not run
    modelopt: PeerRow | None
    output: Output

    @property
    def path(self) -> Path:
        """The INT8 model file."""
        return Path(self.output.model)

    @property
    def report_path(self) -> Path:
        return Path(self.output.report)

    def table(self) -> str:
        """A fixed-width table of every model measured, then the held-out set, the comparison rows'
        notes and the mixed-precision search."""
        head = (f"{'model':34} {'Y-PSNR':>7} {'drop':>6} {'SSIM':>7} {'PSNR/fp32':>9} {'ms':>8} {'x fp32':>6} "
                f"{'Q/DQ':>9} {'int8 MACs':>9} {'rest':>4}  TensorRT")
        lines = [head, "-" * len(head), *self._rows()]
        lat, held = self.latency, self.calibration["holdout_images"]
        lines.append(f"held-out: {len(held)} images ({', '.join(held)}), latency: median of {lat.repeats} at "
                     f"{lat.input[2]}x{lat.input[3]}, {lat.threads} thread(s)")
        if self.native_kernels:
            lines.append(self.native_kernels.line())
        lines += [n for key, row in self._peers() if row is not None and (n := row.note(key))]
        return "\n".join(lines + self.mixed_precision.lines())

    def _peers(self) -> list[tuple[str, PeerRow | None]]:
        return [("peer", self.peer), ("modelopt", self.modelopt)]

    def _rows(self) -> list[str]:
        mp, c = self.mixed_precision, self.checks
        rows = [("fp32", self.quality.fp32.mean, "fp32", (0, 0), None, "fp32", "-"),
                (f"int8 symmetric ({self.recipe['method']})", self.quality.int8.mean, "int8",
                 (c.q_nodes, c.dq_nodes), mp.mac_share, mp.remainder.dtype if mp.remainder else "fp32", "yes")]
        for key, r in self._peers():
            if r is not None and r.quality is not None:
                rows.append((PEER_LABELS[key], r.quality.mean, key, (r.checks.q_nodes, r.checks.dq_nodes),
                             r.mac_share, r.remainder, "yes" if r.trt_compatible else "NO"))
        ms, ratio = self.latency.median_ms, self.latency.ratio_vs_fp32
        fp32_y = self.quality.fp32.mean.y_psnr
        out = []
        for name, m, key, (nq, ndq), share, rest, trt in rows:
            vs = "-" if key == "fp32" else f"{m.psnr_vs_fp32:.2f}"
            y = f"{m.y_psnr:.3f}" if m.y_psnr is not None else "-"
            drop = f"{fp32_y - m.y_psnr:.3f}" if key != "fp32" and m.y_psnr is not None and fp32_y is not None else "-"
            s = f"{m.ssim:.4f}" if m.ssim is not None else "-"
            sh = f"{100 * share['int8']:.1f}%" if share else "-"
            out.append(f"{name:34} {y:>7} {drop:>6} {s:>7} {vs:>9} {ms[key]:8.2f} {ratio[key]:6.2f} {f'{nq}/{ndq}':>9} "
                       f"{sh:>9} {rest:>4}  {trt}")
        return out
