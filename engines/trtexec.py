"""The `trtexec` command line equivalent to a build, for users who prefer NVIDIA's tool."""

from __future__ import annotations

import shlex
from pathlib import Path

from .identity import BuildOptions
from .profile import Profile
from .trt import strongly_typed_only


def precision_flags(precision: str, trt_version: str) -> list[str]:
    """TensorRT 10 needs the precision enabled by flag; TensorRT 11 removed them (strongly typed).

    An fp32 build disables TF32 so the engine computes what the fp32 ONNX does.
    """
    if precision == "fp32":
        return ["--noTF32"]
    if strongly_typed_only(trt_version):
        return []
    return {"fp16": ["--fp16"], "int8": ["--int8"]}[precision]


def _shape(name: str, dims) -> str:
    return f"{name}:{'x'.join(str(d) for d in dims)}"


def trtexec_command(*, onnx: Path | str, engine: Path | str, input_name: str, profile: Profile, precision: str,
                    options: BuildOptions, trt_version: str, timing_cache: Path | str | None = None) -> str:
    args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}",
            f"--minShapes={_shape(input_name, profile.min)}",
            f"--optShapes={_shape(input_name, profile.opt)}",
            f"--maxShapes={_shape(input_name, profile.max)}"]
    args += precision_flags(precision, trt_version)
    if options.workspace_gb is not None:
        # trtexec's pool sizes are in MiB
        args.append(f"--memPoolSize=workspace:{int(round(options.workspace_gb * 1024))}")
    if options.hardware_compat != "none":
        args.append(f"--hardwareCompatibilityLevel={options.hardware_compat}")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    return shlex.join(args)
