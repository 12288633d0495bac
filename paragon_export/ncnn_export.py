"""ncnn: fused checkpoint (or fp32 ONNX) -> verified NCNN `.param`/`.bin` pairs, fp32 and fp16 storage.

API (what the `ncnn` command and `release` call):

    export_ncnn(source, out_dir, *, onnx=None, precisions=("fp32", "fp16"), scale=None,
                verify_sizes=VERIFY_SIZES, force=False) -> {"fp32": Artifact, "fp16": Artifact}

The route is pnnx reading our verified fp32 ONNX (opset 17, dynamic H/W). pnnx's TorchScript route
is not used: it leaves the Magic upsampler's second replicate pad (after the transposed conv) as an
`F.pad` layer ncnn cannot load. chaiNNer's onnx2ncnn is not used either: it cannot read opset-17
Split and pads the 1xk band convs on all four sides. Each pair is run on the ncnn wheel (CPU, fp32
arithmetic) against the fused PyTorch model on real photos at every verification size (one
non-square, not a multiple of 8) plus a batch of 2, within `verify.NCNN_LIMITS`; an fp32 ONNX source
without a checkpoint is checked against ORT CPU on that file instead.

Writes `{out_dir}/{variant}_x{scale}_{fp32|fp16}.param` + `.bin` + `.json` (scale, precision, blob
names, verification figures) atomically; pnnx's side files (.pt, _pnnx.py, .ncnn.py, pnnx.param...)
stay in a temp folder that is removed. If anything fails nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import __version__
from .artifact import Artifact, atomic_output, check_output, sha256_file
from .errors import ParagonError
from .metrics import json_finite
from .ncnn_runner import INSTALL_HINT, SIDECAR_FORMAT, NcnnRunner, ncnn_version
from .verify import NCNN_LIMITS, VERIFY_SIZES, VERIFY_THREADS, Verification, compare_groups, run_torch, verification_inputs

PRECISIONS = ("fp32", "fp16")
PNNX_TIMEOUT_S = 1800
# Shapes pnnx infers with: small (conversion time) and two distinct ones, so it keeps H/W dynamic.
PNNX_SHAPES = ("[1,3,40,56]f32", "[1,3,48,72]f32")


def ncnn_filename(variant: str, scale: int, precision: str, suffix: str) -> str:
    return f"{variant}_x{scale}_{precision}{suffix}"


def pnnx_executable() -> tuple[str, str]:
    """(path of the pnnx binary, pnnx version); a missing package is one line with the install hint."""
    try:
        import pnnx
    except ImportError:
        raise ParagonError(f"pnnx is not installed ({INSTALL_HINT})") from None
    return pnnx.EXEC_PATH, getattr(pnnx, "__version__", "?")


def _require_ncnn() -> None:
    if ncnn_version() is None:
        raise ParagonError(f"ncnn is not installed; it runs the verification ({INSTALL_HINT})")


def _unconverted(param: Path) -> list[str]:
    """Layer types pnnx left in its own namespace (F.pad, torch.xxx): ncnn has no such layer."""
    types = [line.split()[0] for line in param.read_text().splitlines()[2:] if line.split()]
    return sorted({t for t in types if "." in t})


def run_pnnx(onnx_path: Path, work: Path, precision: str) -> tuple[Path, Path]:
    """Convert `onnx_path` with pnnx inside `work`; returns the (param, bin) it wrote there."""
    exe, _ = pnnx_executable()
    if onnx_path.parent.resolve() != work.resolve():
        # pnnx writes NAME.pnnxsim.onnx beside the ONNX it reads, whatever outputs it is given
        shutil.copyfile(onnx_path, work / "model.onnx")
        onnx_path = work / "model.onnx"
    stem = work / f"pnnx_{precision}"
    param, weights = stem.with_suffix(".ncnn.param"), stem.with_suffix(".ncnn.bin")
    # every output named, so nothing lands beside the source ONNX or in the working folder
    args = [exe, str(onnx_path), f"inputshape={PNNX_SHAPES[0]}", f"inputshape2={PNNX_SHAPES[1]}",
            f"fp16={int(precision == 'fp16')}", f"ncnnparam={param}", f"ncnnbin={weights}",
            f"ncnnpy={stem}_ncnn.py", f"pnnxparam={stem}.pnnx.param", f"pnnxbin={stem}.pnnx.bin",
            f"pnnxpy={stem}_pnnx.py", f"pnnxonnx={stem}.pnnx.onnx"]
    try:
        r = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=PNNX_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ParagonError(f"pnnx could not run: {e}") from None
    if r.returncode != 0 or not (param.is_file() and weights.is_file()):
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise ParagonError(f"pnnx failed on {onnx_path.name} (exit {r.returncode}): {lines[-1] if lines else 'no output'}")
    left = _unconverted(param)
    if left:
        raise ParagonError(f"pnnx left operators ncnn has no layer for: {', '.join(left)}; nothing written")
    return param, weights


def _source(source: Path, scale: int | None) -> dict:
    """What the source is (variant, scale, upsampler, reference) without fusing or exporting yet, so
    bad outputs are refused before the slow part: {"info", "checkpoint" | "onnx"}."""
    from .runners import artifact_kind

    kind = artifact_kind(source)
    if not source.is_file():
        raise ParagonError(f"{source} does not exist")
    if kind == "checkpoint":
        from .checkpoint import load_model

        lm = load_model(source, scale=scale)
        return {"info": {"variant": lm.variant, "scale": lm.scale, "upsampler": lm.upsampler,
                         "reference": "fused PyTorch fp32"}, "checkpoint": lm}
    if kind != "onnx":
        raise ParagonError(f"{source.name}: ncnn converts a checkpoint or an fp32 .onnx (this is a {kind} file)")
    import onnx as onnx_lib

    from .onnx_graph import read_metadata
    from .runners import onnx_precision

    try:
        proto = onnx_lib.load(str(source), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ParagonError(f"{source}: not a readable ONNX file ({type(e).__name__})") from None
    precision, _ = onnx_precision(proto)
    if precision != "fp32":
        raise ParagonError(f"{source.name} is an {precision} ONNX file: ncnn converts the fp32 one "
                           "(fp16 storage is written from it)")
    meta = read_metadata(proto)
    s = int(meta["scale"]) if meta.get("scale", "").isdigit() else scale
    if s is None:
        raise ParagonError(f"{source.name} does not record its scale: pass --scale")
    return {"info": {"variant": meta.get("variant", source.stem.split("_x")[0]), "scale": s,
                     "upsampler": meta.get("upsampler", "unknown"),
                     "reference": "the source ONNX on ONNX Runtime CPU fp32"}, "onnx": source}


def _reference(src: dict, work: Path, onnx: Path | None):
    """(reference callable on NCHW arrays, the fp32 ONNX pnnx converts). A checkpoint is fused (and the
    fusion verified) here and, unless `onnx` is given, exported to a verified fp32 ONNX in `work`."""
    if "checkpoint" in src:
        from .export_onnx import export_model, fused_model

        lm = src["checkpoint"]
        model, _ = fused_model(lm)
        if onnx is None:
            meta = {"producer": "paragon-export", "variant": lm.variant, "scale": str(lm.scale),
                    "upsampler": lm.upsampler, "precision": "fp32", "source_sha256": lm.sha256}
            onnx = export_model(model, work / "model.onnx", meta=meta, force=True).path
        return (lambda x: run_torch(model, x)), Path(onnx)
    from .onnx_graph import ort_session, run_session

    import numpy as np

    sess = ort_session(src["onnx"], threads=VERIFY_THREADS)
    # image by image, as NCNN runs them: an ONNX file with a static batch of 1 is a valid source too
    return (lambda x: np.concatenate([run_session(sess, x[i:i + 1]) for i in range(len(x))])), src["onnx"]


def verify_ncnn(param: Path, reference, scale: int, sizes=VERIFY_SIZES) -> Verification:
    """Run the pair on ncnn (fp32 arithmetic, 1 thread) and `reference` on the verification inputs."""
    inputs = verification_inputs(scale, sizes)
    refs = {(g, n): reference(x) for g, n, x in inputs}
    runner = NcnnRunner(param, name=param.name, threads=VERIFY_THREADS)
    outputs, errors = {}, {}
    with runner:
        for g, n, x in inputs:
            try:
                outputs[(g, n)] = runner.infer({"input": x})["output"]
            except ParagonError as e:
                errors.setdefault(g, str(e))
    return compare_groups(outputs, refs, errors)


def export_ncnn(source: Path | str, out_dir: Path | str, *, onnx: Path | str | None = None,
                precisions: tuple[str, ...] = PRECISIONS, scale: int | None = None, verify_sizes=VERIFY_SIZES,
                force: bool = False) -> dict[str, Artifact]:
    """Checkpoint or fp32 ONNX -> verified NCNN pairs (see the module docstring). `onnx`: the fp32 ONNX
    already exported from the checkpoint `source` (release passes its own; saves a second export)."""
    source = Path(source)
    bad = sorted(set(precisions) - set(PRECISIONS))
    if bad or not precisions:
        raise ParagonError(f"ncnn precisions are fp32 and/or fp16, got {','.join(precisions) or 'none'}")
    _, pnnx_version = pnnx_executable()
    _require_ncnn()
    src = _source(source, scale)
    info = src["info"]
    out_dir = Path(out_dir)
    names = {p: {sfx: out_dir / ncnn_filename(info["variant"], info["scale"], p, sfx)
                 for sfx in (".param", ".bin", ".json")} for p in precisions}
    inputs = [source, onnx]
    for files in names.values():
        for f in files.values():
            check_output(f, force=force, inputs=inputs)
    with tempfile.TemporaryDirectory(prefix="paragon-ncnn-") as tmp:
        work = Path(tmp)
        reference, onnx_path = _reference(src, work, Path(onnx) if onnx else None)
        arts = {}
        with contextlib.ExitStack() as stack:  # all files or none: renamed only after every pair verified
            for p in precisions:
                param, weights = run_pnnx(onnx_path, work, p)
                v = verify_ncnn(param, reference, info["scale"], verify_sizes)
                lim = NCNN_LIMITS[p]
                if math.isnan(v.max_abs) or v.max_abs > lim.max_abs or v.min_psnr < lim.min_psnr:
                    raise ParagonError(f"NCNN {p} verification failed (ncnn CPU vs {info['reference']}, max abs, limit "
                                       f"{lim.max_abs:g}, PSNR >= {lim.min_psnr:g} dB): {v.describe()}; nothing written")
                report = {**v.to_json(), "limits": {"max_abs": lim.max_abs, "min_psnr": lim.min_psnr},
                          "reference": info["reference"]}
                meta = _sidecar(info, p, source, onnx_path, pnnx_version, param, weights, report)
                for sfx, made in ((".param", param), (".bin", weights)):
                    dst = stack.enter_context(atomic_output(names[p][sfx], force=force, inputs=inputs))
                    shutil.copyfile(made, dst)
                dst = stack.enter_context(atomic_output(names[p][".json"], force=force, inputs=inputs))
                dst.write_text(json.dumps(meta, indent=1) + "\n")
                arts[p] = Artifact(names[p][".param"], "ncnn", meta)
    return arts


def _sidecar(info: dict, precision: str, source: Path, onnx_path: Path, pnnx_version: str, param: Path,
             weights: Path, report: dict) -> dict:
    lines = param.read_text().splitlines()
    first = next(ln.split() for ln in lines[2:] if ln.split() and ln.split()[0] == "Input")
    return {
        "format": SIDECAR_FORMAT, "toolkit_version": __version__, "variant": info["variant"], "scale": info["scale"],
        "upsampler": info["upsampler"], "precision": precision,
        "storage": "fp16 weights" if precision == "fp16" else "fp32 weights",
        "input_blob": first[-1], "layout": "CHW RGB [0,1] per image (NCNN has no batch axis); any H/W",
        "source": {"path": str(source), "sha256": sha256_file(source)},
        "converter": {"route": "fp32 ONNX (opset 17) -> pnnx -> ncnn", "pnnx": pnnx_version,
                      "onnx_sha256": sha256_file(onnx_path)},
        # the pair is the ONNX graph layer for layer: bench's MACs per LR pixel come from it (SAME-padded
        # convs: the figure does not depend on the input size)
        "macs_per_lr_pixel": _macs_per_pixel(onnx_path),
        "files": {"param": sha256_file(param), "bin": sha256_file(weights)},
        "verification": json_finite({**report, "runtime": f"ncnn {ncnn_version()} CPU, fp32 arithmetic"}),
    }


def _macs_per_pixel(onnx_path: Path) -> float | None:
    import onnx

    from .onnx_graph import macs_per_pixel

    return macs_per_pixel(onnx.load(str(onnx_path)), VERIFY_SIZES[0])
