"""qat: quantization-aware fine-tuning with NVIDIA ModelOpt, exported as a Q/DQ INT8 ONNX.

    qat(ckpt, out_dir, *, data_dir=None, settings=Settings(steps=, lr=, batch=, patch=, gt_weight=,
        magic=), resume=False, force=False, ptq_baseline=True, ...) -> (Artifact, report)

Flow: load the checkpoint and fuse it (QAT trains the deployed graph, the one TensorRT runs); keep
a deep copy as the fp32 teacher; insert int8 fake quantizers with `mtq.quantize` calibrated (max)
on the shared calibration set (`calibration.build_calibration_set` on the same folder); fine-tune
the student with Adam (5% linear warm-up, then cosine to 0) on seeded random patches of the calibration
images: L1 to the teacher's output, plus `gt_weight` x L1 to the HR ground truth; export the
student with the TorchScript exporter to a Q/DQ ONNX with dynamic H/W, simplify it, check every
zero point is int8 0, and verify ORT against the torch fake-quant model on real photos at two
sizes. The held-out split of the calibration set gives the progress bar's PSNR and the report.

Resume: `{out_dir}/qat_state.safetensors` holds the student weights with every quantizer's amax
and Adam's moment tensors; `qat_state.json` the step, the hyper-parameters, the fp32/PTQ figures
and the sha256 of the checkpoint, the calibration set and the tensor file. Both are rewritten
atomically every `save_every` steps, at the end and on Ctrl-C. Nothing is pickled.

Float layers: QAT quantizes every conv TensorRT has an int8 kernel for and leaves the rest
(`int8_check.trt_int8_exclusions`: ModelOpt's small-channel rules) to the fp16 remainder, so it
ships the full int8 share PTQ's accuracy search cannot afford; the fine-tuning recovers the
accuracy instead. The exported Q/DQ graph gets the same fp16 remainder (with its overflow guard)
as the int8 command's, and is verified as shipped. The PTQ baseline (the `int8` command on the
same FP32 graph and calibration set) is reported beside it.

Magic-Conv filters: `magic="int8"` (default) quantizes the resampling ConvTranspose; its depthwise
1x7/7x1 sharpen convs have no TensorRT int8 kernel and stay fp16. `magic="float"` keeps all three
fp16. Measured figures for both are in the README.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .artifact import Artifact, atomic_output, check_output, sha256_file
from .checkpoint import load_model
from .errors import ParagonError
from .images import bicubic_downscale, list_images, sample_photo_paths
from .metrics import psnr, psnr_y, ssim_y
from .qat_export import REMAINDER_MIN_PSNR, check_verification, export_qdq, remainder_effect, verify_qdq
from .verify import VERIFY_SIZES, describe

DEFAULT_STEPS = 1500
DEFAULT_LR = 5e-4
DEFAULT_BATCH = 8
DEFAULT_PATCH = 48  # LR pixels
PATCHES_PER_IMAGE = 16
WARMUP = 0.05  # fraction of the steps
STATE_NAME, STATE_JSON, REPORT_NAME = "qat_state.safetensors", "qat_state.json", "qat_report.json"
STATE_FORMAT = "paragon-export-qat-state/1"


def onnx_name(variant: str, scale: int, opset: int) -> str:
    return f"{variant}_x{scale}_int8_qat_op{opset}.onnx"


# ---------------------------------------------------------------- data

@dataclass
class TrainPatches:
    """Seeded (LR, HR) patch pool cut from the calibration images (never from the held-out split).
    A step's batch depends only on (seed, step), so a resumed run sees the batches an
    uninterrupted one would have."""

    lr: np.ndarray  # N x 3 x p x p
    hr: np.ndarray  # N x 3 x ps x ps
    seed: int

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(0, len(self.lr), size)
        lr, hr = self.lr[idx], self.hr[idx]
        # Flips and transposes: the same dihedral transform on LR and HR.
        if rng.random() < 0.5:
            lr, hr = lr[..., ::-1], hr[..., ::-1]
        if rng.random() < 0.5:
            lr, hr = lr[..., ::-1, :], hr[..., ::-1, :]
        if rng.random() < 0.5:
            lr, hr = lr.swapaxes(-1, -2), hr.swapaxes(-1, -2)
        return torch.from_numpy(np.ascontiguousarray(lr)), torch.from_numpy(np.ascontiguousarray(hr))


def calibration_image_paths(data_dir: Path | None, names: list[str]) -> list[Path]:
    paths = sample_photo_paths("train") if data_dir is None else list_images(data_dir)
    wanted = set(names)
    return [p for p in paths if p.name in wanted]


def train_patches(paths: list[Path], *, scale: int, patch: int, seed: int,
                  per_image: int = PATCHES_PER_IMAGE) -> TrainPatches:
    from paragon_export.calibration.sources import Decoded, decode

    lrs, hrs = [], []
    hp = patch * scale
    for p in paths:
        d = decode(p, min_hw=(hp, hp))
        if not isinstance(d, Decoded):
            continue
        rng = np.random.default_rng([seed, len(p.name), *p.name.encode()])
        img = d.image
        for _ in range(per_image):
            top = int(rng.integers(0, img.shape[0] // scale - patch + 1)) * scale
            left = int(rng.integers(0, img.shape[1] // scale - patch + 1)) * scale
            hr, lr = bicubic_downscale(img[top:top + hp, left:left + hp], scale)
            lrs.append(lr.transpose(2, 0, 1))
            hrs.append(hr.transpose(2, 0, 1))
    if not lrs:
        raise ParagonError(f"no calibration image is at least {hp}x{hp} px: cannot cut {patch}px training patches "
                           "(use smaller --patch)")
    return TrainPatches(np.stack(lrs).astype(np.float32), np.stack(hrs).astype(np.float32), seed)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def _sr(model, lr: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None]).numpy()[0].transpose(1, 2, 0)


def torch_quality(model, holdout, scale: int, fp32_ref: list[np.ndarray] | None) -> dict:
    """Held-out figures of a torch model in the int8 report's format (`int8_eval.Evaluator`):
    Y-PSNR/SSIM vs HR and PSNR vs the fp32 outputs `fp32_ref`, per image and mean."""
    per = []
    for i, h in enumerate(holdout):
        y = _sr(model, h.lr)
        item = {"image": h.name, "lr": list(h.lr.shape[:2])}
        if fp32_ref is not None:
            item["psnr_vs_fp32"] = psnr(np.clip(y, 0, 1), np.clip(fp32_ref[i], 0, 1))
        if h.hr is not None:
            item["y_psnr"] = psnr_y(y, h.hr, scale)
            item["ssim"] = ssim_y(y, h.hr, scale)
        per.append(item)
    mean = {k: float(np.mean([p[k] for p in per])) for k in ("psnr_vs_fp32", "y_psnr", "ssim") if per and k in per[0]}
    return {"mean": mean, "images": per}


def with_drop(q: dict, fp32: dict) -> dict:
    if "y_psnr" in q["mean"] and "y_psnr" in fp32["mean"]:
        q["mean"]["y_psnr_drop"] = fp32["mean"]["y_psnr"] - q["mean"]["y_psnr"]
    return q


# ---------------------------------------------------------------- the run

@dataclass
class Settings:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch: int = DEFAULT_BATCH
    patch: int = DEFAULT_PATCH
    gt_weight: float = 0.0
    magic: str = "int8"
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def check(self) -> None:
        if self.steps < 0 or self.batch < 1 or self.patch < 8 or self.eval_every < 1 or self.save_every < 1:
            raise ParagonError("qat needs steps >= 0, batch >= 1, patch >= 8, eval/save intervals >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.gt_weight >= 0 and math.isfinite(self.gt_weight)):
            raise ParagonError(f"qat needs lr > 0 and gt weight >= 0 (got lr={self.lr}, gt weight={self.gt_weight})")

    # What a resumed run must share with the saved one (steps and the learning rate may change).
    def identity(self) -> dict:
        return {"batch": self.batch, "patch": self.patch, "gt_weight": self.gt_weight, "magic": self.magic,
                "seed": self.seed}


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
    settings: Settings
    scale: int
    step: int = 0
    history: list = field(default_factory=list)

    @classmethod
    def create(cls, fused: torch.nn.Module, forward_loop, settings: Settings, scale: int,
               keep_float: list[str] = ()) -> "QATRun":
        """Teacher = frozen copy of `fused`; student = a copy with int8 fake quantizers calibrated by
        `forward_loop`, minus the quantizers named in `keep_float` (those layers stay float)."""
        from .qat_quant import quantize, quantizers

        teacher = copy.deepcopy(fused).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = quantize(copy.deepcopy(fused).eval(), forward_loop, magic=settings.magic)
        enabled = quantizers(student)
        for name in keep_float:
            if name in enabled:
                enabled[name].disable()
        opt = torch.optim.Adam(student.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps)
        return cls(teacher, student, opt, settings, scale)

    def loss(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            target = self.teacher(lr)
        out = self.student(lr)
        distill = F.l1_loss(out, target)
        total = distill + self.settings.gt_weight * F.l1_loss(out, hr) if self.settings.gt_weight else distill
        return total, float(distill.detach())

    def train_step(self, patches: TrainPatches) -> float:
        s = self.settings
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


def save_state(run: QATRun, out_dir: Path, extra: dict) -> None:
    from safetensors.torch import save_file

    tensor_path, json_path = out_dir / STATE_NAME, out_dir / STATE_JSON
    with atomic_output(tensor_path, force=True) as tmp:
        save_file(run.state_tensors(), str(tmp), metadata={"format": STATE_FORMAT, "step": str(run.step)})
    doc = {"format": STATE_FORMAT, "step": run.step, "steps": run.settings.steps, "lr": run.settings.lr,
           "betas": list(run.settings.betas), "eps": run.settings.eps, **run.settings.identity(),
           "history": run.history, "tensors_sha256": sha256_file(tensor_path), **extra}
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


# ---------------------------------------------------------------- the command

VERIFY_MIN_PSNR = 40.0  # ORT's int8 kernels vs torch fake quant differ by rounding flips only


def _train(run: QATRun, patches: TrainPatches, holdout, out_dir: Path, extra: dict, *, progress: bool) -> float:
    """Steps run.step..settings.steps with periodic held-out PSNR and state saves. Returns seconds."""
    from tqdm import tqdm

    s = run.settings
    t0 = time.perf_counter()
    bar = tqdm(total=s.steps, initial=run.step, desc="QAT", unit="step", disable=not progress, dynamic_ncols=True)
    losses: list[float] = []
    held = run.history[-1]["heldout_y_psnr"] if run.history else None
    try:
        while run.step < s.steps:
            losses.append(check_diverged(run.train_step(patches), run.step, s.lr))
            bar.update(1)
            if run.step % s.eval_every == 0 or run.step == s.steps:
                held = torch_quality(run.student, holdout, run.scale, None)["mean"].get("y_psnr")
                run.history.append({"step": run.step, "distill_l1": float(np.mean(losses)), "heldout_y_psnr": held})
                losses = []
            recent = losses[-20:] or [run.history[-1]["distill_l1"]]
            bar.set_postfix_str(f"distill L1 {np.mean(recent):.2e}" + (f", held-out Y-PSNR {held:.3f} dB" if held else ""))
            if run.step % s.save_every == 0 and run.step < s.steps:
                save_state(run, out_dir, extra)
    except KeyboardInterrupt:
        bar.close()
        save_state(run, out_dir, extra)
        raise ParagonError(f"interrupted at step {run.step}/{s.steps}; state saved in {out_dir} "
                           "(run the same command with --resume to continue)") from None
    bar.close()
    if s.steps > 0:
        save_state(run, out_dir, extra)
    return time.perf_counter() - t0


def _fp32_onnx(fused, loaded, tmp: Path, opset: int) -> Path:
    """The fused model as a verified FP32 ONNX (the int8 evaluator's reference and PTQ's input)."""
    from .export_onnx import export_model, onnx_filename

    path = tmp / onnx_filename(loaded.variant, loaded.scale, "fp32", opset)
    export_model(fused, path, meta={"scale": str(loaded.scale), "variant": loaded.variant,
                                    "source_sha256": loaded.sha256}, opset=opset, force=True)
    return path


def _ptq(fp32: Path, cal, out: Path, threads: int, force: bool, say) -> dict:
    """The `int8` command with its defaults on the same FP32 graph and calibration set; its model and
    report are written to `out` (the user gets the PTQ artifact too)."""
    from .int8 import quantize_int8

    say("PTQ baseline: paragon-export int8 (defaults) on the same model and calibration set")
    art = quantize_int8(fp32, out, calib=cal, peer=False, threads=threads, force=force,
                        progress=lambda m: say(f"  {m}"))
    r = art.meta
    return {"model": r["output"]["model"], "report": r["output"]["report"], "quality": r["quality"]["int8"],
            "checks": r["checks"], "kept_float": r["mixed_precision"]["kept_float"], "method": r["recipe"]["method"],
            "mixed_precision_met": r["mixed_precision"]["met"]}


def _float_quantizers(fused, excluded: dict) -> tuple[list[str], list[str]]:
    """Quantizers to disable: those of the convs TensorRT has no int8 kernel for (`excluded`, from
    `int8_check.trt_int8_exclusions`, by ONNX node name); they run fp16 in the shipped file.
    Returns (quantizer names, unmatched nodes)."""
    from .qat_quant import quantizers_for_nodes

    return quantizers_for_nodes(fused, sorted(excluded))


def qat(ckpt: Path | str, out_dir: Path | str, *, data_dir: Path | str | None = None, settings: Settings | None = None,
        resume: bool = False, force: bool = False, opset: int = 17, verify_sizes=VERIFY_SIZES, ptq_baseline: bool = True,
        threads: int = 1, train_threads: int | None = None, progress: bool = True,
        calib_options: dict | None = None, say=None) -> tuple[Artifact, dict]:
    """Checkpoint + images -> QAT fine-tuned, verified Q/DQ INT8 ONNX in `out_dir` (module docstring).
    Returns the ONNX Artifact (meta: metadata + report) and the report (also `qat_report.json`).
    `threads`: ORT threads for evaluation and timing; `train_threads`: torch threads (None: torch's
    default; on a machine shared with other jobs, 1 is often several times faster than 2)."""
    if train_threads is None:
        return _qat(ckpt, out_dir, data_dir=data_dir, settings=settings, resume=resume, force=force, opset=opset,
                    verify_sizes=verify_sizes, ptq_baseline=ptq_baseline, threads=threads, progress=progress,
                    calib_options=calib_options, say=say)
    if train_threads < 1:
        raise ParagonError(f"train threads must be >= 1, got {train_threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(train_threads)
    try:
        return _qat(ckpt, out_dir, data_dir=data_dir, settings=settings, resume=resume, force=force, opset=opset,
                    verify_sizes=verify_sizes, ptq_baseline=ptq_baseline, threads=threads, progress=progress,
                    calib_options=calib_options, say=say)
    finally:
        torch.set_num_threads(before)


def _qat(ckpt, out_dir, *, data_dir, settings, resume, force, opset, verify_sizes, ptq_baseline, threads, progress,
         calib_options, say) -> tuple[Artifact, dict]:
    import tempfile

    import onnx

    from paragon_export.calibration import build_calibration_set

    from .export_onnx import fused_model
    from .int8 import CALIB_PROBES
    from .int8_check import inspect_qdq, mac_shares, trt_int8_exclusions
    from .int8_eval import Evaluator, latency, native_vs_reference
    from .int8_remainder import FP16_QDQ_OPSET, dtype_mac_shares, plan_remainder
    from .onnx_graph import set_metadata

    say = say or (lambda _m: None)
    settings = settings or Settings()
    settings.check()
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    loaded = load_model(ckpt)
    # The fp16 remainder's Q/DQ scales are fp16, which needs opset 19.
    onnx_path = out_dir / onnx_name(loaded.variant, loaded.scale, max(opset, FP16_QDQ_OPSET))
    report_path = out_dir / REPORT_NAME
    for p in (onnx_path, report_path):
        check_output(p, force=force)
    if not resume and (out_dir / STATE_JSON).exists() and not force:
        raise ParagonError(f"{out_dir} holds a saved QAT run: pass --resume to continue it or --force to start over")
    doc, tensors = read_state(out_dir) if resume else (None, None)
    fused, fusion = fused_model(loaded)
    data_dir = Path(data_dir) if data_dir is not None else None
    cal = build_calibration_set(data_dir, scale=loaded.scale, **(calib_options or {}))
    if not cal.holdout or any(h.hr is None for h in cal.holdout):
        raise ParagonError("qat needs held-out HR images to measure quality (give a folder of >= 2 HR photos)")
    for sk in cal.skipped:
        say(f"warning: skipped {sk}")
    patches = train_patches(calibration_image_paths(data_dir, cal.calib_images), scale=loaded.scale,
                            patch=settings.patch, seed=settings.seed)
    ident = {"source_sha256": loaded.sha256, "calibration_fingerprint": cal.fingerprint, **settings.identity()}

    with tempfile.TemporaryDirectory(prefix="paragon-qat-") as tmp_name:
        tmp = Path(tmp_name)
        say("exporting the fused fp32 model to ONNX (reference)")
        fp32_path = _fp32_onnx(fused, loaded, tmp, opset)
        ev = Evaluator(fp32_path, cal, loaded.scale, threads)
        fp32_graph = onnx.load(str(fp32_path))
        excluded = trt_int8_exclusions(fp32_graph)
        rest = plan_remainder("fp16", fp32_graph, [cal.batch(i) for i in range(min(len(cal), CALIB_PROBES))])
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            changed = [k for k, v in ident.items() if doc.get(k) != v]
            if changed:
                raise ParagonError(f"--resume: the saved run differs in {', '.join(changed)} "
                                   "(same checkpoint, images and settings needed; --force starts over)")
            if doc["step"] > settings.steps:
                raise ParagonError(f"--resume: the saved run is at step {doc['step']}, past --steps {settings.steps}")
            ptq, keep_float, unmatched = doc.get("ptq"), doc["keep_float"], doc.get("unmatched_float_nodes", [])
            first = torch.from_numpy(cal.batch(0))
            # Calibrating on one batch only creates the amax buffers; the saved values replace them.
            run = QATRun.create(fused, lambda m: m(first), settings, loaded.scale, keep_float)
            run.load_tensors(tensors)
            run.step, run.history = int(doc["step"]), list(doc.get("history", []))
            ptq_modelopt = doc["ptq_modelopt"]
            say(f"resuming at step {run.step} of {settings.steps}")
        else:
            ptq = _ptq(fp32_path, cal, out_dir / "ptq", threads, force, say) if ptq_baseline else None
            keep_float, unmatched = _float_quantizers(fused, excluded)
            say(f"inserting int8 fake quantizers (ModelOpt), calibrating on {len(cal.crops)} crops; "
                f"{len(excluded)} convs without a TensorRT int8 kernel stay fp16")
            run = QATRun.create(fused, cal.forward_loop, settings, loaded.scale, keep_float)
            ptq_modelopt = with_drop(torch_quality(run.student, cal.holdout, loaded.scale, ev.ref), ev.fp32)
            run.history.append({"step": 0, "distill_l1": None, "heldout_y_psnr": ptq_modelopt["mean"]["y_psnr"]})
        start_step = run.step
        extra = {**ident, "ptq_baseline": ptq is not None, "ptq": ptq, "keep_float": keep_float,
                 "unmatched_float_nodes": unmatched, "ptq_modelopt": ptq_modelopt}
        if not resume:
            save_state(run, out_dir, extra)  # step 0: a run interrupted in its first steps resumes without PTQ
        train_s = _train(run, patches, cal.holdout, out_dir, extra, progress=progress)

        say("exporting Q/DQ ONNX and verifying it on ONNX Runtime")
        graph, info = export_qdq(run.student, opset=opset)
        if info["trt_blockers"]:
            raise ParagonError(f"the QAT Q/DQ model is not TensorRT-compatible: {'; '.join(info['trt_blockers'])}")
        meta = {"producer": "paragon-export", "variant": loaded.variant, "scale": str(loaded.scale),
                "upsampler": loaded.upsampler, "precision": "int8-qdq", "quantization": "qat (nvidia-modelopt)",
                "io_dtype": "float32", "opset": str(opset), "source_sha256": loaded.sha256,
                "calibration_fingerprint": cal.fingerprint, "qat_steps": str(run.step),
                "magic_filters": settings.magic, "input_shape": "Nx3xHxW", "layout": "NCHW RGB [0,1]"}
        # The export is checked before the fp16 remainder, whose own effect is measured apart
        # (the fp32 fake-quant student cannot show fp16 rounding ahead of each QuantizeLinear).
        verification = verify_qdq(graph, run.student, loaded.scale, verify_sizes)
        plain, graph = graph, rest.apply(graph)
        set_metadata(graph, meta)
        verification["remainder"] = remainder_effect(plain, graph, loaded.scale, verify_sizes)
        check_verification(verification, VERIFY_MIN_PSNR)
        qat_path = tmp / "qat.onnx"
        onnx.save(graph, str(qat_path))
        info.pop("checks")
        checks = inspect_qdq(graph)
        shares = dtype_mac_shares(graph, mac_shares(fp32_graph))
        quality = {"fp32": ev.fp32, "ptq_modelopt": ptq_modelopt,
                   "qat_torch": with_drop(torch_quality(run.student, cal.holdout, loaded.scale, ev.ref), ev.fp32),
                   "qat_int8": ev.quality(qat_path)}
        models = {"fp32": fp32_path, "qat_int8": qat_path}
        if ptq is not None:
            quality["ptq_int8"] = ptq["quality"]
            if Path(ptq["model"]).is_file():
                models["ptq_int8"] = Path(ptq["model"])
        say("timing on ONNX Runtime CPU")
        lat = latency(models, cal.holdout[0].lr, threads=threads)
        lat["ratio_vs_fp32"] = {k: v / lat["median_ms"]["fp32"] for k, v in lat["median_ms"].items()}

        report = {
            "command": "qat",
            "model": {"source": str(loaded.path), "source_sha256": loaded.sha256, "variant": loaded.variant,
                      "scale": loaded.scale, "upsampler": loaded.upsampler, "fusion": fusion},
            "calibration": cal.summary(),
            "recipe": {"tool": "nvidia-modelopt", "format": "QDQ", "calibrator": "max",
                       "activations": "int8 symmetric (zero point 0), per tensor",
                       "weights": "int8 symmetric, per-channel (Conv axis 0, ConvTranspose axis 1)",
                       "bias": "float", "quantized_ops": ["Conv", "ConvTranspose"], "output_quantization": False,
                       "magic_filters": settings.magic, "trt_excluded": excluded, "remainder": rest.summary(),
                       "mac_share": shares, "float_quantizers": keep_float, "unmatched_float_nodes": unmatched, "trt_compatible": True},
            "checks": {k: v for k, v in checks.items() if k != "quantized_nodes"}
                      | {"quantized_nodes": len(checks["quantized_nodes"])},
            "export": info,
            "training": {"steps": run.step, "resumed_from": start_step if resume else None,
                         "steps_this_run": run.step - start_step, "train_seconds": round(train_s, 2),
                         "seconds_per_step": round(train_s / max(1, run.step - start_step), 4),
                         "lr": settings.lr, "schedule": "cosine to 0", "batch": settings.batch,
                         "patch": settings.patch, "gt_weight": settings.gt_weight,
                         "loss": "L1 to the fp32 teacher" + (f" + {settings.gt_weight} x L1 to HR" if settings.gt_weight else ""),
                         "train_patches": int(len(patches.lr)), "history": run.history},
            "verification": {**verification, "min_psnr_limit": VERIFY_MIN_PSNR, "reference": "torch fake-quant student",
                             "remainder_min_psnr_limit": REMAINDER_MIN_PSNR,
                             "runtime": "onnxruntime CPU, Q/DQ reference semantics"},
            "native_kernels": native_vs_reference(qat_path, [h.lr for h in cal.holdout], threads),
            "quality": quality,
            "ptq": ptq,
            "latency": lat,
        }
        with atomic_output(onnx_path, force=force) as t:
            t.write_bytes(qat_path.read_bytes())
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["output"] = {"model": str(onnx_path), "sha256": sha256_file(onnx_path), "report": str(report_path)}
    with atomic_output(report_path, force=force) as t:
        t.write_text(json.dumps(report, indent=1, default=_json_default))
    return Artifact(onnx_path, "onnx-int8", {"metadata": meta, **report}), report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def format_table(report: dict) -> str:
    """fp32 / PTQ / QAT side by side, in the int8 command's table layout."""
    q, lat = report["quality"], report["latency"]
    ms, ratio = lat["median_ms"], lat["ratio_vs_fp32"]
    chk = report["checks"]
    rows = [("fp32 (ONNX)", q["fp32"]["mean"], "fp32", "-", "-", "-")]
    if "ptq_int8" in q:
        p = report["ptq"]
        rows.append((f"PTQ int8 (int8 command, {p['method']})", q["ptq_int8"]["mean"], "ptq_int8",
                     f"{p['checks']['q_nodes']}/{p['checks']['dq_nodes']}", str(len(p["kept_float"])), "yes"))
    rows.append(("PTQ int8 (ModelOpt max, torch)", q["ptq_modelopt"]["mean"], None, "-", "-", "-"))
    rows.append((f"QAT int8 ({report['training']['steps']} steps)", q["qat_int8"]["mean"], "qat_int8",
                 f"{chk['q_nodes']}/{chk['dq_nodes']}", str(len(chk["float_nodes"])),
                 "yes" if not report["export"]["trt_blockers"] else "NO"))
    head = f"{'model':34} {'Y-PSNR':>7} {'SSIM':>7} {'PSNR/fp32':>9} {'ms':>8} {'x fp32':>6} {'Q/DQ':>9} {'float':>5}  TensorRT"
    lines = [head, "-" * len(head)]
    for name, m, key, qdq, kept, trt in rows:
        vs = "-" if name.startswith("fp32") else f"{m['psnr_vs_fp32']:.2f}"
        y = f"{m['y_psnr']:.3f}" if "y_psnr" in m else "-"
        s = f"{m['ssim']:.4f}" if "ssim" in m else "-"
        t = f"{ms[key]:8.2f} {ratio[key]:6.2f}" if key in ms else f"{'-':>8} {'-':>6}"
        lines.append(f"{name:34} {y:>7} {s:>7} {vs:>9} {t} {qdq:>9} {kept:>5}  {trt}")
    n = len(report["calibration"]["holdout_images"])
    lines.append(f"held-out: {n} images ({', '.join(report['calibration']['holdout_images'])}), "
                 f"latency: median of {lat['repeats']} at {lat['input'][2]}x{lat['input'][3]}, {lat['threads']} thread(s)")
    fp = q["fp32"]["mean"].get("y_psnr")
    if fp is not None:
        gains = [f"QAT vs fp32 {q['qat_int8']['mean']['y_psnr'] - fp:+.3f} dB"]
        if "ptq_int8" in q:
            gains.append(f"QAT vs PTQ {q['qat_int8']['mean']['y_psnr'] - q['ptq_int8']['mean']['y_psnr']:+.3f} dB")
        lines.append("Y-PSNR: " + ", ".join(gains))
    sh = report["recipe"].get("mac_share")
    if sh:
        lines.append(f"QAT conv MACs: int8 {100 * sh['int8']:.1f}%, fp16 {100 * sh['fp16']:.1f}%, "
                     f"fp32 {100 * sh['fp32']:.1f}% ({len(chk['float_nodes'])} convs without a TensorRT int8 kernel)")
    v = report["verification"]
    sizes = ", ".join(f"{g}: max abs {r['max_abs']:.2e}, PSNR {r['psnr']:.1f} dB" for g, r in v["groups"].items()
                      if "max_abs" in r)
    lines.append(f"ORT (Q/DQ reference semantics) vs torch fake quant, fp32 remainder: {sizes}")
    if v.get("remainder"):
        lines.append(f"fp16 remainder vs fp32 remainder (ORT): {describe(v['remainder'], 'psnr')}")
    if report.get("native_kernels"):
        from .int8_eval import format_native

        lines.append(format_native(report["native_kernels"]))
    return "\n".join(lines)
