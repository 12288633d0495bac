"""qat_run: one QAT run's teacher, student and optimizer (the API's building block; tests drive it),
its learning-rate schedule, and its resumable state.

Resume: `{out_dir}/qat_state.safetensors` holds the student weights with every quantizer's amax
and Adam's moment tensors; `qat_state.json` the step, the hyper-parameters, the fp32/PTQ figures
and the sha256 of the checkpoint, the calibration set and the tensor file. Both are rewritten
atomically every `save_every` steps, at the end and on Ctrl-C. Nothing is pickled."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .artifact import atomic_output, sha256_file
from .errors import ParagonError
from .qat_data import TrainPatches
from .qat_recipe import QATRecipe
from .int8_eval import Quality
from .qat_result import HistoryPoint, PTQBaseline

WARMUP = 0.05  # fraction of the steps
STATE_NAME, STATE_JSON = "qat_state.safetensors", "qat_state.json"
STATE_FORMAT = "paragon-export-qat-state/1"


def learning_rate(base: float, step: int, total: int) -> float:
    """Linear warm-up over the first 5% of the steps (Adam's first updates are full-size sign steps,
    which knock a calibrated network off balance), then cosine decay to 0."""
    warm = max(1, round(WARMUP * total))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step - warm, total) / max(total - warm, 1)))


def check_diverged(distill: float, step: int, lr: float) -> float:
    """The step's distillation L1, or one line when training has diverged: a NaN/Inf loss, or a mean
    error above 1 (teacher outputs are images in [0, 1]: the student no longer produces an image)."""
    if not math.isfinite(distill) or distill > 1.0:
        raise ParagonError(f"QAT diverged at step {step}: distillation loss {distill:.3g} (NaN/Inf or above 1); "
                           f"lower --lr (it is {lr:g})")
    return distill


@dataclass
class QATRun:
    """Teacher, student and optimizer of one QAT run (the API's building block; tests drive it)."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    recipe: QATRecipe
    scale: int
    step: int = 0
    history: list[HistoryPoint] = field(default_factory=list)

    @classmethod
    def create(cls, fused: torch.nn.Module, forward_loop, recipe: QATRecipe, scale: int,
               keep_float: list[str] = ()) -> "QATRun":
        """Teacher = frozen copy of `fused`; student = a copy with int8 fake quantizers calibrated by
        `forward_loop`, minus the quantizers named in `keep_float` (those layers stay float)."""
        from .qat_quant import quantize, quantizers

        teacher = copy.deepcopy(fused).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = quantize(copy.deepcopy(fused).eval(), forward_loop, magic=recipe.magic)
        enabled = quantizers(student)
        for name in keep_float:
            if name in enabled:
                enabled[name].disable()
        opt = torch.optim.Adam(student.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
        return cls(teacher, student, opt, recipe, scale)

    def loss(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            target = self.teacher(lr)
        out = self.student(lr)
        distill = F.l1_loss(out, target)
        total = distill + self.recipe.gt_weight * F.l1_loss(out, hr) if self.recipe.gt_weight else distill
        return total, float(distill.detach())

    def train_step(self, patches: TrainPatches) -> float:
        s = self.recipe
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(s.lr, self.step, s.steps)
        lr, hr = patches.batch(self.step, s.batch)
        self.student.train()
        total, distill = self.loss(lr, hr)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.student.eval()
        self.step += 1
        return distill

    @torch.no_grad()
    def distill_loss(self, lr: torch.Tensor) -> float:
        self.student.eval()
        return float(F.l1_loss(self.student(lr), self.teacher(lr)))

    # ------------------------------------------------------------ state (safetensors + JSON)
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in self.student.state_dict().items()}
        names = {id(p): n for n, p in self.student.named_parameters()}
        for p, st in self.optimizer.state.items():
            n = names[id(p)]
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in st:
                    t = st[k] if torch.is_tensor(st[k]) else torch.tensor(float(st[k]))
                    out[f"adam.{k}.{n}"] = t.detach().cpu().contiguous().clone()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.student.load_state_dict(model_sd, strict=True)
        except RuntimeError as e:
            raise ParagonError(f"saved QAT state does not fit this model: {str(e).splitlines()[0]}") from None
        params = dict(self.student.named_parameters())
        for n, p in params.items():
            st = {k: tensors.get(f"adam.{k}.{n}") for k in ("exp_avg", "exp_avg_sq", "step")}
            if all(v is not None for v in st.values()):
                self.optimizer.state[p] = {"step": st["step"].float(), "exp_avg": st["exp_avg"].clone(),
                                           "exp_avg_sq": st["exp_avg_sq"].clone()}


@dataclass
class Baselines:
    """What a run carries besides its tensors, saved with them: the PTQ baseline (None: --no-ptq),
    ModelOpt's calibrated student before training, the quantizers left float (and the ONNX nodes
    no quantizer matched), and `ident`, what a resumed run must share with the saved one."""

    ident: dict
    ptq: PTQBaseline | None
    ptq_modelopt: Quality
    keep_float: list[str]
    unmatched_float_nodes: list[str]

    def to_json(self) -> dict:
        return {**self.ident, "ptq_baseline": self.ptq is not None, "ptq": None if self.ptq is None else self.ptq.to_json(),
                "keep_float": self.keep_float, "unmatched_float_nodes": self.unmatched_float_nodes,
                "ptq_modelopt": self.ptq_modelopt.to_json()}

    @classmethod
    def from_json(cls, doc: dict, ident: dict) -> "Baselines":
        """From a saved state (`read_state`), for a run that shares `ident` with it."""
        ptq = doc.get("ptq")
        return cls(ident, None if ptq is None else PTQBaseline.from_json(ptq), Quality.from_json(doc["ptq_modelopt"]),
                   doc["keep_float"], doc.get("unmatched_float_nodes", []))


def save_state(run: QATRun, out_dir: Path, extra: dict) -> None:
    """The run's tensors and `qat_state.json`: the run's step, recipe and history, plus `extra` (`Baselines.to_json`)."""
    from safetensors.torch import save_file

    tensor_path, json_path = out_dir / STATE_NAME, out_dir / STATE_JSON
    with atomic_output(tensor_path, force=True) as tmp:
        save_file(run.state_tensors(), str(tmp), metadata={"format": STATE_FORMAT, "step": str(run.step)})
    doc = {"format": STATE_FORMAT, "step": run.step, "steps": run.recipe.steps, "lr": run.recipe.lr,
           "betas": list(run.recipe.betas), "eps": run.recipe.eps, **run.recipe.identity(),
           "history": [h.to_json() for h in run.history], "tensors_sha256": sha256_file(tensor_path), **extra}
    with atomic_output(json_path, force=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))


def read_state(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_path, json_path = out_dir / STATE_NAME, out_dir / STATE_JSON
    if not tensor_path.is_file() or not json_path.is_file():
        raise ParagonError(f"--resume: no saved QAT state in {out_dir} (expected {STATE_NAME} and {STATE_JSON})")
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise ParagonError(f"--resume: {json_path} is not readable JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ParagonError(f"--resume: {json_path} is not a {STATE_FORMAT} file")
    if sha256_file(tensor_path) != doc.get("tensors_sha256"):
        raise ParagonError(f"--resume: {tensor_path} does not match {json_path} (sha256 differs; partial copy?)")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ParagonError(f"--resume: {tensor_path} is not a valid safetensors file: {e}") from None
    return doc, tensors
