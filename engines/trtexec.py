"""The `trtexec` command line equivalent to a build, for users who prefer NVIDIA's tool."""

from __future__ import annotations

import shlex
from pathlib import Path

from .identity import BuildOptions
from .profile import Profile
from .trt import strongly_typed_only


def typing_flags(trt_version: str) -> list[str]:
    """The flags that make trtexec build what `builder.compile_engine` builds, for every precision: a
    strongly typed network (TensorRT 10 needs `--stronglyTyped`; 11 is always strongly typed) with TF32
    off. Never `--fp16`/`--int8`: they make a TensorRT 10 network weakly typed, and 11 removed them; the
    precision is the ONNX's own types.
    """
    return ([] if strongly_typed_only(trt_version) else ["--stronglyTyped"]) + ["--noTF32"]


def _shape(name: str, dims) -> str:
    return f"{name}:{'x'.join(str(d) for d in dims)}"


def trtexec_command(*, onnx: Path | str, engine: Path | str, input_name: str, profile: Profile, precision: str,
                    options: BuildOptions, trt_version: str, timing_cache: Path | str | None = None) -> str:
    """The trtexec line for a build. `precision` does not change it (the ONNX's types decide); it is
    kept so callers describe the build fully."""
    args = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}",
            f"--minShapes={_shape(input_name, profile.min)}",
            f"--optShapes={_shape(input_name, profile.opt)}",
            f"--maxShapes={_shape(input_name, profile.max)}"]
    args += typing_flags(trt_version)
    if options.workspace_gb is not None:
        # trtexec's pool sizes are in MiB
        args.append(f"--memPoolSize=workspace:{int(round(options.workspace_gb * 1024))}")
    if options.hardware_compat != "none":
        args.append(f"--hardwareCompatibilityLevel={options.hardware_compat}")
    if options.version_compatible:
        args.append("--versionCompatible")
    if options.refittable:
        args.append("--refit")
    if options.strip_weights:
        args.append("--stripWeights")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    return shlex.join(args)


def trtexec_for_onnx(onnx: Path | str, out_dir: Path | str | None, *, profile: str | None = None,
                     preset: str | None = None, options: BuildOptions = BuildOptions(), trt_version: str = "11",
                     timing_cache: Path | str | None = None) -> str:
    """`engine --print-trtexec`: the trtexec line for an ONNX without TensorRT or a GPU (for vs-mlrt-style
    frontends). The engine is named `{stem}.engine` in `out_dir` (default: next to the ONNX): the name of
    our builds holds the GPU, which only a build on it knows."""
    from paragon_export.errors import ParagonError

    from .onnx_info import inspect_onnx
    from .profile import choose_profile
    from .trt import trt_major

    if trt_major(trt_version) < 10:
        raise ParagonError(f"--trt-version {trt_version}: paragon-export engines need TensorRT 10 or newer")
    model = inspect_onnx(onnx)
    prof = choose_profile(model, profile=profile, preset=preset)
    engine = Path(out_dir or model.path.parent) / f"{model.path.stem}.engine"
    return trtexec_command(onnx=model.path, engine=engine, input_name=model.input_name, profile=prof,
                           precision=model.precision, options=options, trt_version=trt_version,
                           timing_cache=timing_cache)
