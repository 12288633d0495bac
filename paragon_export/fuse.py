"""fuse: checkpoint -> fused (deploy-form) checkpoint, with exactness and dynamic->static gap checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from paragon_export.arch import calibrate_kernels

from .artifact import Artifact, check_output
from .checkpoint import LoadedModel, load_model, param_count, save_model
from .errors import ParagonError
from .images import list_images, lr_hr_crops, sample_photo_paths, bicubic_downscale, to_image, to_tensor
from .metrics import psnr, psnr_y
from .records import Record
from .verify import VERIFY_SIZES

EXACT_ATOL = 1e-5
CALIB_LR_SIZE = 96
CALIB_MIN_LR = 8  # smaller crops say little about a kernel (and 1 px cannot be downscaled)


def _calibration_batches(folder: Path, scale: int, limit: int = 64) -> tuple[list[torch.Tensor], list]:
    """Centre LR crops of the folder's images, every file decoded first: unreadable and too-small
    files are skipped and listed (as int8 --calib does), not a traceback halfway through."""
    from paragon_export.calibration.sources import readable_images, require_some

    paths = list_images(folder)
    if not paths:
        raise ParagonError(f"no images in calibration folder {folder}")
    side = CALIB_MIN_LR * scale
    usable, skipped = readable_images(paths[:limit], min_hw=(side, side))
    require_some(usable, skipped, str(folder))
    batches = []
    for d in usable:
        _, lr = bicubic_downscale(d.image, scale)
        h, w = min(lr.shape[0], CALIB_LR_SIZE), min(lr.shape[1], CALIB_LR_SIZE)
        top, left = (lr.shape[0] - h) // 2, (lr.shape[1] - w) // 2
        batches.append(to_tensor(lr[top:top + h, left:left + w]))
    return batches, skipped


@torch.no_grad()
def _run(model, lr: np.ndarray) -> np.ndarray:
    return to_image(model(to_tensor(lr)))


@dataclass
class Gap(Record):
    """What fusing costs against training's per-image kernels (dynamic), on larger crops."""

    psnr_fused_vs_dynamic: float
    y_psnr_dynamic: float
    y_psnr_fused: float
    images: int
    hr_source: str


@dataclass
class FusionCheck(Record):
    """The fused model against the unfused one: max abs per verification size (static kernels, must be
    exact) and the dynamic->static gap."""

    exactness: dict[str, float]
    gap: Gap
    exactness_max_abs: float

    def require_exact(self) -> None:
        if self.exactness_max_abs > EXACT_ATOL:
            raise ParagonError(f"fusion is not exact: max abs {self.exactness_max_abs:.3g} > {EXACT_ATOL}")


@dataclass
class FusionReport(FusionCheck):
    """The `fuse` step's report: the check, the model and what the calibration read."""

    variant: str = ""
    scale: int = 0
    upsampler: str = ""
    params_before: int = 0
    params_after: int = 0
    calibrated_images: int = 0
    skipped_images: list[str] | None = None


@torch.no_grad()
def verify_fusion(unfused, fused, scale: int, hr_paths: list[Path] | None = None) -> FusionCheck:
    """Exactness (fused vs unfused static) at two sizes and the dynamic->static gap."""
    paths = hr_paths or sample_photo_paths("eval")
    exactness = {}
    for size in VERIFY_SIZES:
        diffs = [float(np.abs(_run(unfused, lr) - _run(fused, lr)).max()) for _, lr, _ in lr_hr_crops(paths, scale, size)]
        exactness[f"{size[0]}x{size[1]}"] = max(diffs)
    # The gap is measured on larger crops: the per-sample kernels depend on global image content.
    psnr_vs_dyn, y_dyn, y_fused = [], [], []
    unfused.set_dynamic_inference(True)
    try:
        for _, lr, hr in lr_hr_crops(paths, scale, (96, 96)):
            dyn, fus = _run(unfused, lr), _run(fused, lr)
            psnr_vs_dyn.append(psnr(np.clip(fus, 0, 1), np.clip(dyn, 0, 1)))
            y_dyn.append(psnr_y(dyn, hr, scale))
            y_fused.append(psnr_y(fus, hr, scale))
    finally:
        unfused.set_dynamic_inference(False)
    gap = Gap(float(np.mean(psnr_vs_dyn)), float(np.mean(y_dyn)), float(np.mean(y_fused)), len(y_dyn),
              "user" if hr_paths else "bundled held-out photos")
    return FusionCheck(exactness, gap, max(exactness.values()))


def fuse(src: Path | str, out: Path | str, *, variant: str | None = None, scale: int | None = None,
         calibrate_dir: Path | None = None, hr_dir: Path | None = None, force: bool = False) -> tuple[Artifact, FusionReport]:
    out = check_output(out, force=force, inputs=[src, calibrate_dir, hr_dir])
    loaded: LoadedModel = load_model(src, variant=variant, scale=scale)
    if loaded.fused:
        raise ParagonError(f"{src} is already fused")
    model = loaded.model
    calibrated, skipped = 0, []
    if calibrate_dir is not None:
        batches, skipped = _calibration_batches(Path(calibrate_dir), loaded.scale)
        calibrated = calibrate_kernels(model, batches)
    missing = model.uninitialized_kernels()
    if missing:
        raise ParagonError(
            f"{len(missing)} of {sum(1 for _ in model.transformers())} tracked kernels were never initialised "
            f"(e.g. {missing[0]}); fusing would bake identity kernels. Pass --calibrate-kernels DIR to set "
            "them from real images"
        )
    fused = model.fuse_for_release().eval()
    hr_paths = None
    if hr_dir:
        from paragon_export.calibration.sources import readable_folder

        hr_paths, hr_skipped = readable_folder(hr_dir)
        skipped += hr_skipped
    check = verify_fusion(model, fused, loaded.scale, hr_paths)
    report = FusionReport(check.exactness, check.gap, check.exactness_max_abs, loaded.variant, loaded.scale,
                          loaded.upsampler, param_count(model), param_count(fused), calibrated, [str(s) for s in skipped])
    report.require_exact()
    art = save_model(fused, out, variant=loaded.variant, force=force,
                     extra={"source_sha256": loaded.sha256, "kernels_calibrated": str(calibrated)})
    art.meta["report"] = report.to_json()
    return art, report
