"""The peer row of the int8 report: NVIDIA ModelOpt's own ONNX PTQ on the same calibration crops.

ModelOpt (`modelopt.onnx.quantization.quantize`) is what a TensorRT user would reach for first, so the
int8 report measures our recipe against it, run as a user would: its defaults (int8, entropy
calibration, fp16 remainder, its own choice of which convs to quantize), calibrated on CPU with the
crops our search uses. Its ONNX code needs extras that the core install lacks (`modelopt-onnx` in
pyproject.toml); without them the row is skipped with `PeerUnavailable`.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx

from paragon_export.calibration import CalibrationSet

from .errors import ParagonError
from .int8_check import inspect_qdq

INSTALL_HINT = "pip install -c constraints.txt 'paragon-export[modelopt-onnx]'"
# What quantize() is called with beyond the model and the data; everything else stays its default.
# calibration_eps: its default tries CUDA and TensorRT first; the peer runs where our PTQ runs, on CPU.
OPTIONS = {"calibration_eps": ["cpu"], "log_level": "ERROR"}
# The defaults that shape the result, named in the recipe (modelopt 0.47; read back at run time).
DEFAULTS_SHOWN = ("quantize_mode", "high_precision_dtype", "passes")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                onnx.TensorProto.FLOAT: "fp32"}


class PeerUnavailable(ParagonError):
    """ModelOpt's ONNX quantizer cannot be imported here; the message is one line with the fix."""


def _import_quantize():
    """`modelopt.onnx.quantization.quantize`, imported on first use: it pulls onnx-graphsurgeon & co."""
    try:
        with _quiet():
            from modelopt.onnx.quantization import quantize
    except ImportError as e:  # modelopt re-raises a missing extra as ImportError("No module named ...\n...")
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PeerUnavailable(f"ModelOpt's ONNX quantizer cannot be imported ({why}); "
                              f"install its extras: {INSTALL_HINT}") from None
    return quantize


@contextlib.contextmanager
def _quiet(log: io.StringIO | None = None):
    """Swallow ModelOpt's and ORT's calibration chatter (logger lines, print()s, tqdm bars)."""
    log = log if log is not None else io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        yield log


@contextlib.contextmanager
def _private_tempdir(folder: Path):
    """A scratch folder inside `folder` that also serves as `tempfile`'s default for the duration:
    ModelOpt writes its intermediate models next to the output and ONNX Runtime's calibrator
    writes its augmented model to the temp dir, and nothing may land outside the output's folder."""
    work = Path(tempfile.mkdtemp(prefix=".modelopt-peer-", dir=folder))
    old = tempfile.tempdir
    tempfile.tempdir = str(work)
    try:
        yield work
    finally:
        tempfile.tempdir = old
        shutil.rmtree(work, ignore_errors=True)


def _defaults(quantize) -> dict:
    import inspect

    params = inspect.signature(quantize).parameters
    return {k: params[k].default for k in DEFAULTS_SHOWN if k in params}


def _remainder(model: onnx.ModelProto) -> str:
    """The dtype of the float initializers left in the graph (weights, biases, Q/DQ scales)."""
    kinds = {_FLOAT_TYPES[i.data_type] for i in model.graph.initializer if i.data_type in _FLOAT_TYPES}
    return "+".join(sorted(kinds)) if kinds else "none"


def _recipe(version: str, defaults: dict, crops) -> str:
    n, _, h, w = crops.shape
    shown = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    return (f"NVIDIA ModelOpt {version} ONNX PTQ, modelopt.onnx.quantization.quantize(calibration_eps=['cpu'], "
            f"calibration_data=<{n} crops {h}x{w}>); its defaults: {shown}, calibration_method='entropy', "
            "its own conv exclusions and Q/DQ placement")


# Modules ModelOpt's ONNX quantizer imports beyond the core install (checked before starting it).
EXTRA_MODULES = ("onnx_graphsurgeon", "onnxslim", "onnxscript", "onnx_ir", "lief")


def modelopt_peer(fp32: Path, calib: CalibrationSet, out: Path) -> dict:
    """ModelOpt's ONNX PTQ (its defaults: int8, its calibration method, fp16 remainder) on the same
    calibration crops; writes `out` (the quantized ONNX, one self-contained file). Returns
    {"recipe", "model", "remainder", "excluded_nodes"}; raises PeerUnavailable without the extras.

    It runs in a child process: importing `modelopt.onnx.quantization` patches ONNX Runtime's
    calibrators for the whole process, which would change every later calibration of ours."""
    import json
    import subprocess
    import sys

    import numpy as np

    for name in EXTRA_MODULES:
        try:
            __import__(name)
        except ImportError as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PeerUnavailable(f"ModelOpt's ONNX quantizer cannot be imported ({why}); "
                                  f"install its extras: {INSTALL_HINT}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".modelopt-crops-", dir=out.parent) as work:
        crops = Path(work) / "crops.npy"
        np.save(crops, calib.crops)
        proc = subprocess.run([sys.executable, "-m", "paragon_export.int8_peer", str(fp32), str(crops), str(out)],
                              capture_output=True, text=True)
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ParagonError(f"ModelOpt's ONNX PTQ failed: {tail}") from None
    if "unavailable" in doc:
        raise PeerUnavailable(doc["unavailable"])
    if "error" in doc:
        raise ParagonError(doc["error"])
    return doc


def _quantize_here(fp32: Path, crops, out: Path) -> dict:
    """The body of `modelopt_peer`, run in a child process."""
    quantize = _import_quantize()
    import modelopt

    fp32, out = Path(fp32), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    with _private_tempdir(out.parent) as work:
        # A copy of the input in the scratch folder: ModelOpt re-saves the model under derived
        # names (`<name>_named.onnx`, `_opset19`, ...) that must not collide with the user's files.
        src = work / "fp32.onnx"
        onnx.save(onnx.load(str(fp32)), str(src))
        dst = work / "peer.onnx"
        try:
            with _quiet(log):
                # One numpy array: ModelOpt splits it along the (dynamic) batch axis, one crop a step.
                quantize(str(src), calibration_data=crops, output_path=str(dst), **OPTIONS)
        except Exception as e:  # ModelOpt and ORT raise their own types; the user gets one line
            raise ParagonError(f"ModelOpt's ONNX PTQ failed: {type(e).__name__}: "
                               f"{(str(e).strip().splitlines() or [''])[0]}") from None
        finally:
            _detach_modelopt_logger()
        if not dst.exists():
            tail = (log.getvalue().strip().splitlines() or ["no output"])[-1]
            raise ParagonError(f"ModelOpt's ONNX PTQ wrote no model ({tail})")
        # Loaded with any external data it chose, saved as one file (our models are far below 2 GB).
        model = onnx.load(str(dst))
        onnx.save(model, str(out))
    return {"recipe": _recipe(modelopt.__version__, _defaults(quantize), crops), "model": str(out),
            "remainder": _remainder(model), "excluded_nodes": inspect_qdq(model)["float_nodes"]}


def _detach_modelopt_logger() -> None:
    """ModelOpt's console handler captured our redirected stdout buffer; drop it so later modelopt
    log lines neither pile up there nor reach the user."""
    import logging

    lg = logging.getLogger("modelopt.onnx")
    for h in lg.handlers[:]:
        lg.removeHandler(h)


def _main(argv: list[str]) -> int:
    import json

    import numpy as np

    fp32, crops, out = argv
    try:
        doc = _quantize_here(Path(fp32), np.load(crops), Path(out))
    except PeerUnavailable as e:
        doc = {"unavailable": str(e)}
    except ParagonError as e:
        doc = {"error": str(e)}
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
