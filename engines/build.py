"""`build_engine`: ONNX -> TensorRT engine for this GPU, named by its identity and recorded in the
folder's manifest; `verify_engine` loads one on this GPU (`load.load_engine` refuses engines built for
another GPU/TensorRT); `rebuild_engine` rebuilds one from the ONNX its manifest entry names.

`target` and `compile_fn` exist so the bookkeeping can be tested without TensorRT: by default the
target is queried from TensorRT and the driver, and compilation is `builder.compile_engine`.
"""

from __future__ import annotations

import datetime
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from paragon_export import __version__
from paragon_export.artifact import Artifact, atomic_output, check_output_dir, sha256_file
from paragon_export.errors import ParagonError
from paragon_export.records import Record, optional

from .gpu import GpuInfo
from .identity import HARDWARE_COMPAT, BuildOptions, EngineKey, engine_filename, incompatibility, make_key
from .load import Target, current_target, load_engine, manifest_entry
from .manifest import put_entry, read_manifest
from .onnx_info import OnnxInfo, inspect_onnx
from .profile import Profile, choose_profile, validate_profile
from .trtexec import trtexec_command

if TYPE_CHECKING:  # the check (numpy, images) is imported only when an engine is checked
    from .check import EngineCheck


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BuildReport(Record):
    """What `build_engine` did; `to_json` is the report as a dict (the check as its own JSON)."""

    engine: str
    digest: str
    key: dict
    trtexec: str
    status: str  # built | up to date
    gpu: str
    trt_version: str
    precision: str
    precision_note: str
    profile: str
    check: EngineCheck | None = None
    others: list[str] = field(default_factory=list)  # the same model's engines for other GPUs/TensorRT
    build_seconds: float | None = optional()  # only when something was built, as the report always had it

    def text(self) -> str:
        lines = [f"note: {self.precision_note}"] if "but the graph is" in self.precision_note else []
        lines += [f"note: also in {Path(self.engine).parent}: {o} (kept; it is for another GPU/TensorRT)"
                  for o in self.others]
        lines += [f"{self.status}: {self.engine}",
                  f"  {self.precision}, profile {self.profile} (min:opt:max), {self.gpu}, TensorRT {self.trt_version}, "
                  f"key {self.digest}", "equivalent trtexec command:", f"  {self.trtexec}"]
        if self.check is not None:
            lines.append(self.check.text())
        return "\n".join(lines)


def _check_options(options: BuildOptions, gpu: GpuInfo | None = None) -> None:
    if options.hardware_compat not in HARDWARE_COMPAT:
        raise ParagonError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}")
    if options.workspace_gb is not None and not options.workspace_gb > 0:
        raise ParagonError(f"--workspace must be a positive number of GB, got {options.workspace_gb}")
    if gpu is not None and options.hardware_compat == "ampere+" and gpu.compute_capability < (8, 0):
        raise ParagonError(f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; {gpu.name} is "
                           f"compute {gpu.cc}")


def _entry(key: EngineKey, filename: str, model: OnnxInfo, data: bytes | None, engine_sha: str, *,
           timing_cache: Path, trtexec: str, build_seconds: float | None, check: EngineCheck | None) -> dict:
    return {"file": filename, "key": key.as_dict(), "engine_sha256": engine_sha,
            "engine_bytes": len(data) if data is not None else None,
            "onnx": {"path": str(model.path), "name": model.path.name, "meta": model.meta},
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": build_seconds, "timing_cache": str(timing_cache), "trtexec": trtexec,
            "check": None if check is None else check.summary(),
            "toolkit_version": __version__}


def build_engine(onnx: Path | str, out_dir: Path | str, *, profile: Profile | str | None = None,
                 preset: str | None = None, options: BuildOptions = BuildOptions(),
                 timing_cache: Path | str | None = None, force: bool = False, check: bool = False,
                 reference: Path | str | None = None, progress: Callable[[str], None] = _stderr,
                 target: Target | None = None, compile_fn=None, check_fn=None) -> tuple[Artifact, BuildReport]:
    """Build (or find up to date) the engine of `onnx` for this GPU in `out_dir`.

    With `check`, the new plan is compared with the fp32 ONNX before anything is written: a failed
    check leaves no engine. Returns the engine Artifact and its BuildReport.
    """
    model = inspect_onnx(onnx)
    check_fn = check_fn or functools.partial(_check, options=options)
    if isinstance(profile, Profile):
        prof = validate_profile(profile, model)
        if preset:
            raise ParagonError("give either a profile or a preset, not both")
    else:
        prof = choose_profile(model, profile=profile, preset=preset)
    _check_options(options)
    out = check_output_dir(out_dir)
    target = target or current_target()
    _check_options(options, target.gpu)

    key = make_key(target.gpu, target.trt_version, precision=model.precision, input_name=model.input_name,
                   profile=prof, options=options, onnx_sha256=model.sha256)
    path = out / engine_filename(model.path.stem, key)
    default_cache = _default_cache(target)
    cache = Path(timing_cache) if timing_cache is not None else default_cache
    cmd = trtexec_command(onnx=model.path, engine=path, input_name=model.input_name, profile=prof,
                          precision=model.precision, options=options, trt_version=target.trt_version,
                          timing_cache=cache)
    report = BuildReport(str(path), key.digest, key.as_dict(), cmd, "built", target.gpu.name, target.trt_version,
                         model.precision, model.precision_note, str(prof), others=_others(out, key, target))

    if path.exists() and not force:
        return _up_to_date(out, path, key, report, check_fn if check else None, model, prof, reference)

    progress(f"building {path.name}: {model.precision}, profile {prof}, {target.gpu.name} ({target.gpu.sm}), "
         f"TensorRT {target.trt_version}")
    start = time.monotonic()
    if compile_fn is not None:
        data = compile_fn(model, prof, options, cache)
    else:
        from .builder import compile_engine
        data = compile_engine(target.trt, model, prof, options, timing_cache=cache, fallback_cache=default_cache,
                              progress=progress)
    seconds = round(time.monotonic() - start, 2)
    if check:
        report.check = check_fn(data, model, prof, reference)
        if not report.check.passed:
            raise ParagonError(f"the new engine fails its check, nothing written: {report.check.worst()}")
    with atomic_output(path, force=True) as tmp:
        tmp.write_bytes(data)
    entry = _entry(key, path.name, model, data, sha256_file(path), timing_cache=cache, trtexec=cmd,
                   build_seconds=seconds, check=report.check)
    put_entry(out, key.digest, entry)
    report.build_seconds = seconds
    return Artifact(path, "engine", entry), report


def _up_to_date(out: Path, path: Path, key, report: BuildReport, check_fn, model, prof,
                reference) -> tuple[Artifact, BuildReport]:
    """The engine already in `out` for this key, proved by its manifest entry (and checked again with `check_fn`)."""
    known = read_manifest(out)["engines"].get(key.digest)
    if known is None or known.get("file") != path.name or sha256_file(path) != known.get("engine_sha256"):
        raise ParagonError(f"{path} exists but does not match its manifest entry; use --force to rebuild it")
    report.status = "up to date"
    if check_fn is not None:
        report.check = check_fn(path.read_bytes(), model, prof, reference)
        if not report.check.passed:
            raise ParagonError(f"{path.name} fails its check: {report.check.worst()}")
    return Artifact(path, "engine", known), report


def _default_cache(target: Target) -> Path:
    from .builder import default_timing_cache
    return default_timing_cache(target.gpu, target.trt_version)


def _check(data: bytes, model: OnnxInfo, prof: Profile, reference, options: BuildOptions) -> EngineCheck:
    from .check import check_engine
    return check_engine(data, model, prof, reference=reference, options=options)


def _others(out: Path, key: EngineKey, target: Target) -> list[str]:
    """Engines of the same model, profile and options in `out` that are for other GPUs/TensorRT."""
    found = []
    for entry in read_manifest(out)["engines"].values():
        k = entry.get("key", {})
        if (k.get("onnx_sha256") == key.onnx_sha256 and k.get("profile") == key.profile.as_dict()
                and k.get("options") == key.options.as_dict()):
            other = EngineKey.from_dict(k)
            if other.digest != key.digest and incompatibility(other, target.gpu, target.trt_version):
                found.append(f"{entry['file']} ({other.gpu}, TensorRT {other.trt_version})")
    return found


def verify_engine(path: Path | str, *, check: bool = False, reference: Path | str | None = None,
                  target: Target | None = None) -> tuple[dict, EngineCheck | None]:
    """Load an existing engine on this GPU (key, sha256 and TensorRT deserialization), optionally with
    the --check comparison; returns its manifest entry and the check report (None without check)."""
    manifest_entry(Path(path))  # a missing file or entry is reported before TensorRT is needed
    target = target or current_target()
    data, entry = load_engine(path, target=target)
    from .builder import deserialize
    deserialize(target.trt, data, EngineKey.from_dict(entry["key"]).options, Path(entry["onnx"]["path"]))
    if not check:
        return entry, None
    from .check import check_engine
    key = EngineKey.from_dict(entry["key"])
    return entry, check_engine(data, inspect_onnx(entry["onnx"]["path"]), key.profile, reference=reference,
                               options=key.options)


def rebuild_engine(path: Path | str, **kwargs) -> tuple[Artifact, BuildReport]:
    """Rebuild an engine for this GPU/TensorRT from the ONNX, profile and options its entry records.

    An engine built for another GPU stays where it is (it is still right for that GPU); the new one
    gets its own name. Rebuilding an engine that already fits this GPU replaces it.
    """
    path = Path(path)
    _, entry = manifest_entry(path)
    key = EngineKey.from_dict(entry["key"])
    onnx = Path(entry["onnx"]["path"])
    if not onnx.is_file():
        raise ParagonError(f"cannot rebuild {path.name}: the ONNX it was built from, {onnx}, is gone; build from the "
                           f"ONNX with `paragon-export engine MODEL.onnx -o {path.parent}`")
    if sha256_file(onnx) != key.onnx_sha256:
        raise ParagonError(f"cannot rebuild {path.name}: {onnx} changed since the engine was built (sha256 differs); "
                           f"build from it with `paragon-export engine {onnx} -o {path.parent}`")
    kwargs.setdefault("force", True)
    return build_engine(onnx, path.parent, profile=key.profile, options=key.options, **kwargs)
