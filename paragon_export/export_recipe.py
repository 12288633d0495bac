"""What decides an exported ONNX file, as plain data stored with the artifact (as `Int8Recipe` and
`QATRecipe` are): opset, exporter, shape, the FP16 file and its I/O, the profile. Which checkpoint,
where the files go and whether they may be replaced are not part of it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import ParagonError

OPSETS = range(13, 21)
DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
# "community": what chaiNNer and VideoJaNai-style TensorRT frontends load without options: batch
# fixed to 1, dynamic height/width, fp32 and fp16 (fp16 input/output) files named `2x_<name>_fp16.onnx`.
PROFILES = ("default", "community")


@dataclass(frozen=True)
class ExportRecipe:
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"
    static_shape: tuple[int, int] | None = None  # LR (height, width) baked in; batch stays dynamic
    fp16: bool = False  # also write the FP16 file
    fp16_io: bool = False  # FP16 file with float16 input/output
    fp16_target_psnr: float | None = None  # None: fp16.py's default
    profile: str = "default"

    def check(self) -> ExportRecipe:
        """The recipe as the exporter runs it (community turns on fp16 with fp16 I/O), or one line why not."""
        if self.profile not in PROFILES:
            raise ParagonError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        r = replace(self, fp16=True, fp16_io=True) if self.profile == "community" else self
        if r.profile == "community" and r.static_shape is not None:
            raise ParagonError("--profile community keeps height and width dynamic: drop --static-shape")
        if r.opset not in OPSETS:
            raise ParagonError(f"opset must be {OPSETS.start}-{OPSETS.stop - 1}, got {r.opset}")
        if r.exporter not in EXPORTERS:
            raise ParagonError(f"exporter must be one of {', '.join(EXPORTERS)}, got {r.exporter!r}")
        if r.static_shape is not None and (len(r.static_shape) != 2 or min(r.static_shape) < 1):
            raise ParagonError(f"static shape must be (height, width) >= 1, got {r.static_shape}")
        if r.fp16_io and not r.fp16:
            raise ParagonError("--fp16-io needs --fp16")
        if r.fp16_target_psnr is not None and not r.fp16:
            raise ParagonError("--fp16-min-psnr needs --fp16")
        if r.fp16_target_psnr is not None and not math.isfinite(r.fp16_target_psnr):
            raise ParagonError(f"fp16 min PSNR must be a finite number, got {r.fp16_target_psnr}")
        return r

    @property
    def community(self) -> bool:
        return self.profile == "community"

    def as_dict(self) -> dict:
        return asdict(self)
