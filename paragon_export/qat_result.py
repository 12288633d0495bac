"""qat_result: the QAT report as typed parts. `QATReport.to_json()` is the qat_report.json document
(its keys and values are the file's schema, so existing files and their readers stay valid) and
`from_json` reads one back; `table()` and `markdown()` render the fp32 / PTQ / QAT comparison.

Parts written by other modules keep their own formats as plain dicts: `int8_check.inspect_qdq`
(checks), `calibration` (summary) and `int8_remainder` (remainder, MAC shares). Figures typed elsewhere are
reused: `verify.Verification`, `fuse.FusionCheck`, `int8_eval` (`Quality`, `Latency`, `NativeKernels`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .fuse import FusionCheck
from .int8_eval import Quality
from .records import Record, optional
from .verify import Verification

__all__ = ["ExportInfo", "HistoryPoint", "ModelInfo", "ModelQualities", "PTQBaseline", "QATVerification", "Recipe",
           "Training"]


@dataclass
class ModelQualities(Record):
    """Held-out quality of every model the report compares; ptq_int8 is None without the PTQ baseline."""

    fp32: Quality
    ptq_modelopt: Quality  # ModelOpt's calibrated fake-quant student before training (torch)
    qat_torch: Quality
    qat_int8: Quality  # the shipped Q/DQ ONNX on ONNX Runtime
    ptq_int8: Quality | None = optional()


@dataclass
class HistoryPoint(Record):
    """One held-out check while training; step 0 is the calibrated student (no loss yet)."""

    step: int
    distill_l1: float | None
    heldout_y_psnr: float | None


@dataclass
class PTQBaseline(Record):
    """The `int8` command's result on the same FP32 graph and calibration set."""

    model: str
    report: str
    quality: Quality
    checks: dict  # int8_check.inspect_qdq
    kept_float: list[str]
    method: str
    mixed_precision_met: bool


@dataclass
class ModelInfo(Record):
    source: str
    source_sha256: str
    variant: str
    scale: int
    upsampler: str
    fusion: FusionCheck | None


@dataclass
class Recipe(Record):
    """How the shipped file is quantized; the fixed parts are those of every QAT export."""

    FIXED = {"tool": "nvidia-modelopt", "format": "QDQ", "calibrator": "max",
             "activations": "int8 symmetric (zero point 0), per tensor",
             "weights": "int8 symmetric, per-channel (Conv axis 0, ConvTranspose axis 1)",
             "bias": "float", "quantized_ops": ["Conv", "ConvTranspose"], "output_quantization": False}

    magic_filters: str
    trt_excluded: dict  # int8_check.trt_int8_exclusions
    remainder: dict  # int8_remainder.Remainder.summary
    mac_share: dict[str, float]  # by dtype
    float_quantizers: list[str]
    unmatched_float_nodes: list[str]
    options: dict  # QATRecipe.as_dict

    def to_json(self) -> dict:
        return {**self.FIXED, "magic_filters": self.magic_filters, "trt_excluded": self.trt_excluded,
                "remainder": self.remainder, "mac_share": self.mac_share, "float_quantizers": self.float_quantizers,
                "unmatched_float_nodes": self.unmatched_float_nodes, "trt_compatible": True, "options": self.options}


@dataclass
class ExportInfo(Record):
    """`qat_export.export_qdq`'s account of the export; `checks` (of the graph before the fp16 remainder)
    is not reported, the report's own checks are of the shipped graph."""

    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    simplify: dict
    per_channel_rewritten: int
    trt_blockers: list[str]
    checks: dict | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in super().to_json().items() if k != "checks"}


@dataclass
class Training(Record):
    steps: int
    resumed_from: int | None
    steps_this_run: int
    train_seconds: float
    seconds_per_step: float
    lr: float
    batch: int
    patch: int
    gt_weight: float
    train_patches: int
    history: list[HistoryPoint] = field(default_factory=list)

    @property
    def loss(self) -> str:
        return "L1 to the fp32 teacher" + (f" + {self.gt_weight} x L1 to HR" if self.gt_weight else "")

    def to_json(self) -> dict:
        return {"steps": self.steps, "resumed_from": self.resumed_from, "steps_this_run": self.steps_this_run,
                "train_seconds": self.train_seconds, "seconds_per_step": self.seconds_per_step, "lr": self.lr,
                "schedule": "cosine to 0", "batch": self.batch, "patch": self.patch,
                "gt_weight": self.gt_weight, "loss": self.loss, "train_patches": self.train_patches,
                "history": [h.to_json() for h in self.history]}


@dataclass
class QATVerification(Record):
    """ORT (Q/DQ reference semantics) vs the torch fake-quant student on the fp32-remainder export, and
    the fp16 remainder's own effect (`verify.compare_groups` figures, each with its limit)."""

    REFERENCE, RUNTIME = "torch fake-quant student", "onnxruntime CPU, Q/DQ reference semantics"

    export: Verification
    remainder: Verification | None
    min_psnr_limit: float
    remainder_min_psnr_limit: float

    @property
    def min_psnr(self) -> float:
        return self.export.min_psnr

    def to_json(self) -> dict:
        return {**self.export.to_json(), "remainder": None if self.remainder is None else self.remainder.to_json(),
                "min_psnr_limit": self.min_psnr_limit, "reference": self.REFERENCE,
                "remainder_min_psnr_limit": self.remainder_min_psnr_limit, "runtime": self.RUNTIME}

    @classmethod
    def from_json(cls, d: dict) -> QATVerification:
        return cls(Verification.from_json(d), Verification.from_json(d["remainder"]), d["min_psnr_limit"],
                   d["remainder_min_psnr_limit"])
