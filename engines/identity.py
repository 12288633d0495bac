"""Engine identity: what an engine was built from, for and with, and whether it runs here.

TensorRT engines are not portable: a plan runs only on the GPU architecture (and, by default, the
GPU model) and the exact TensorRT version that built it. The key records all of that plus every
input that changes the plan, so an engine is rebuilt exactly when something that matters changed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from .gpu import GpuInfo, gpu_slug
from .profile import Profile

HARDWARE_COMPAT = ("none", "ampere+")


@dataclass(frozen=True)
class BuildOptions:
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    hardware_compat: str = "none"  # "ampere+": the plan runs on any Ampere or newer GPU
    refittable: bool = False  # BuilderFlag.REFIT: weights can be replaced after fine-tuning, without a rebuild
    version_compatible: bool = False  # BuilderFlag.VERSION_COMPATIBLE: loads in later TensorRT of the same major
    strip_weights: bool = False  # BuilderFlag.STRIP_PLAN: a plan without weights, refitted from the ONNX at load

    def as_dict(self) -> dict:
        # Options added later appear only when set, so keys (and digests) of existing engines stay the same.
        return {k: v for k, v in asdict(self).items() if k in _ORIGINAL_OPTIONS or v}


_ORIGINAL_OPTIONS = ("workspace_gb", "hardware_compat")


@dataclass(frozen=True)
class EngineKey:
    gpu: str
    compute_capability: str  # "9.0"
    trt_version: str
    precision: str
    input_name: str
    profile: Profile
    options: BuildOptions
    onnx_sha256: str

    def as_dict(self) -> dict:
        return {"gpu": self.gpu, "compute_capability": self.compute_capability, "trt_version": self.trt_version,
                "precision": self.precision, "input_name": self.input_name, "profile": self.profile.as_dict(),
                "options": self.options.as_dict(), "onnx_sha256": self.onnx_sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "EngineKey":
        return cls(gpu=d["gpu"], compute_capability=d["compute_capability"], trt_version=d["trt_version"],
                   precision=d["precision"], input_name=d["input_name"], profile=Profile.from_dict(d["profile"]),
                   options=BuildOptions(**d["options"]), onnx_sha256=d["onnx_sha256"])

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_key(gpu: GpuInfo, trt_version: str, *, precision: str, input_name: str, profile: Profile,
             options: BuildOptions, onnx_sha256: str) -> EngineKey:
    return EngineKey(gpu=gpu.name, compute_capability=gpu.cc, trt_version=trt_version, precision=precision,
                     input_name=input_name, profile=profile, options=options, onnx_sha256=onnx_sha256)


def engine_filename(onnx_stem: str, key: EngineKey) -> str:
    """'{model}_{gpu}-sm{cc}_trt{version}_{digest8}.engine'; an ampere+ plan is named for what it runs on."""
    if key.options.hardware_compat == "ampere+":
        target = "ampere-plus"
    else:
        target = f"{gpu_slug(key.gpu)}-sm{key.compute_capability.replace('.', '')}"
    version = re.sub(r"[^0-9.]+", "", key.trt_version)
    return f"{onnx_stem}_{target}_trt{version}_{key.digest[:8]}.engine"


def incompatibility(key: EngineKey, gpu: GpuInfo, trt_version: str) -> str | None:
    """Why an engine with this key cannot run on `gpu` with TensorRT `trt_version` (None if it can)."""
    built = f"{key.gpu} (compute {key.compute_capability}) with TensorRT {key.trt_version}"
    here = f"this machine has {gpu.name} (compute {gpu.cc}) with TensorRT {trt_version}"
    if key.options.version_compatible:
        if not _same_major_not_older(key.trt_version, trt_version):
            return (f"it was built version-compatible for {built}; {here}, and such plans load only in that or a "
                    "later TensorRT of the same major version")
    elif key.trt_version != trt_version:
        return f"it was built for {built}; {here}, and plans only load in the TensorRT version that built them"
    if key.options.hardware_compat == "ampere+":
        if gpu.compute_capability < (8, 0):
            return f"it was built ampere+-compatible ({built}); {here}, which is older than Ampere"
        return None
    if key.gpu != gpu.name or key.compute_capability != gpu.cc:
        return f"it was built for {built}; {here}, and a plan is specific to the GPU model that built it"
    return None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def _same_major_not_older(built: str, here: str) -> bool:
    b, h = _version_tuple(built), _version_tuple(here)
    return bool(b) and bool(h) and b[0] == h[0] and h >= b
