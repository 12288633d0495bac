"""int8_openvino: an INT8 file for OpenVINO, derived from the TensorRT-targeted one, which stays as it is.

ONNX Runtime's QDQ quantizer gives a quantized tensor one Q/DQ pair that every reader shares: in
ParagonSR2 the int8 `project_in` conv and the residual Add both read the DQ after the context Concat.
The file's semantics are well defined (the Add adds the quantized tensor) and TensorRT runs them, but
OpenVINO's CPU plugin computes that shared pair wrongly (each int8 project_in alone breaks it; 7-bit
weights, the u8s8-saturation remedy, do not help; figures in the README). Here every reader of an activation DQ
that is not a conv reads the float tensor its Q quantizes (a Q/DQ pair dedicated to the conv, as
OpenVINO's own quantizer NNCF places them): the same int8 convs, scales and weights, no new
calibration, and the residual path loses a rounding. The file is written only if OpenVINO computes it
as its Q/DQ semantics say (PSNR vs ONNX Runtime's reference path >= the int8 limit on real photos).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .artifact import atomic_output, check_output, sha256_file
from .errors import ParagonError
from .records import Record
from .int8_search import float_behind_qdq
from .onnx_graph import ort_session, read_metadata, set_metadata
from .verify import LIMITS, compare, verification_inputs

WEIGHTED = ("Conv", "ConvTranspose")
SUFFIX = "_openvino"


@dataclass(frozen=True)
class OpenVinoCheck(Record):
    """OpenVINO vs the file's own Q/DQ semantics (ONNX Runtime's reference path): worst PSNR and max abs."""

    min_psnr: float | None  # None: identical
    max_abs: float

    def fails(self) -> bool:
        lim = LIMITS["int8"]
        return (self.min_psnr is not None and self.min_psnr < lim.min_psnr) or self.max_abs > lim.max_abs

    def figures(self) -> str:
        return f"{'identical' if self.min_psnr is None else f'{self.min_psnr:.2f} dB'}, max abs {self.max_abs:.3g}"


@dataclass(frozen=True)
class OpenVinoInt8:
    """The written OpenVINO file and how it was derived and checked."""

    path: Path
    check: OpenVinoCheck
    rewired_inputs: int  # non-conv readers of an activation DQ that now read float
    change: str  # the remedy applied after a failed check ("": none)
    parent: str  # the TensorRT file's name


def output_path(trt_int8: Path | str, out_dir: Path | str) -> Path:
    """`<stem>_openvino.onnx` next to the TensorRT file's name: the label says which runtime it is for."""
    return Path(out_dir) / f"{Path(trt_int8).stem}{SUFFIX}.onnx"


def dedicate_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy whose non-conv readers of an activation DQ read the float tensor before its Q; returns
    (model, number of inputs rewired). Weight Q/DQ pairs and the convs' inputs are untouched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    prod = {o: n for n in out.graph.node for o in n.output}
    rewired = 0
    for node in out.graph.node:
        if node.op_type in WEIGHTED or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if (src := float_behind_qdq(prod, name)) is not None:
                node.input[i] = src
                rewired += 1
    return out, rewired


def check_on_openvino(path: Path, scale: int, threads: int = 1) -> OpenVinoCheck:
    """OpenVINO vs the file's own Q/DQ semantics (ONNX Runtime reference path) on the verification photos."""
    from .runners import open_runner

    ref = ort_session(str(path), threads=threads)
    worst, worst_abs = float("inf"), 0.0
    runner = open_runner(path, "openvino", threads=threads, name="int8-openvino-check")
    with runner:
        for _group, _name, x in verification_inputs(scale, batch=1):
            a = np.clip(ref.run(None, {ref.get_inputs()[0].name: x})[0], 0, 1)
            b = np.clip(next(iter(runner.infer({"input": x}, check_inputs=False).values())), 0, 1)
            c = compare(b, a)  # NaN/Inf in OpenVINO's output: -inf dB, inf max abs
            worst, worst_abs = min(worst, c.psnr), max(worst_abs, c.max_abs)
    return OpenVinoCheck(None if worst == float("inf") else float(worst), worst_abs)


def _measured_scale(path: Path) -> int:
    """The upscale factor of a file without our metadata: output height over input height."""
    sess = ort_session(str(path), threads=1)
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 16, 16), np.float32)})[0]
    if y.ndim != 4 or y.shape[2] % 16:
        raise ParagonError(f"{path}: not an image-to-image model (output {list(y.shape)} for a 16x16 input)")
    return y.shape[2] // 16


def _checked(model: onnx.ModelProto, name: str, scale: int) -> tuple[onnx.ModelProto, OpenVinoCheck, str]:
    """Check `model` on OpenVINO; if it fails, apply what `openvino_int8.diagnose` measures to help: 7-bit
    weights if they pass (u8s8 saturation), else float for the convs that break OpenVINO on their own;
    then check again. Returns (model, check, what was changed or "")."""
    from .openvino_int8 import diagnose, int8_convs, keep_int8, narrow_weights
    from .runners import open_runner

    with tempfile.TemporaryDirectory(prefix="paragon-int8-openvino-") as d:
        probe = Path(d) / name  # runners know a file by its suffix
        onnx.save(model, str(probe))
        check = check_on_openvino(probe, scale)
        if not check.fails():
            return model, check, ""
        feeds = [{"input": x} for _g, _n, x in verification_inputs(scale, batch=1)]
        found = diagnose(probe, lambda p: open_runner(p, "openvino", threads=1, name="diagnose"), feeds,
                         LIMITS["int8"].min_psnr)
        if found.narrow_weights_psnr >= LIMITS["int8"].min_psnr:
            model, change = narrow_weights(model), "7-bit weights (u8s8 saturation)"
        elif found.breaking:
            model = keep_int8(model, set(int8_convs(model)) - set(found.breaking))
            change = "float: " + ",".join(found.breaking)
        else:
            return model, check, ""
        onnx.save(model, str(probe))
        return model, check_on_openvino(probe, scale), change


def write_openvino_int8(trt_int8: Path | str, out_dir: Path | str, *, force: bool = False) -> OpenVinoInt8:
    """Derive and write the OpenVINO INT8 file from the TensorRT-targeted Q/DQ file `trt_int8`. Convs that
    OpenVINO computes wrongly even with dedicated Q/DQ (on this CPU) get the measured remedy, recorded."""
    from .runners import runtime_unavailable

    src = Path(trt_int8)
    missing = runtime_unavailable("openvino")
    if missing:
        raise ParagonError(f"the OpenVINO int8 file is checked on OpenVINO: {missing}")
    model = onnx.load(str(src))
    meta = read_metadata(model)
    if meta.get("precision") not in (None, "int8") or not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        raise ParagonError(f"{src} is not a Q/DQ int8 file")
    scale = int(meta.get("scale", 0)) or _measured_scale(src)
    out = output_path(src, out_dir)
    check_output(out, force=force, inputs=[src])  # before the check's OpenVINO compiles
    derived, rewired = dedicate_qdq(model)
    derived, check, change = _checked(derived, out.name, scale)
    if check.fails():
        lim = LIMITS["int8"]
        raise ParagonError(f"OpenVINO does not compute {out.name} as written: PSNR {check.figures()} vs its Q/DQ "
                           f"semantics (limits {lim.min_psnr:g} dB, {lim.max_abs:g}); nothing written")
    set_metadata(derived, {"target_runtime": "openvino", "derived_from": src.name,
                           "derived_from_sha256": sha256_file(src), "openvino_change": change,
                           "derivation": "activation Q/DQ dedicated to the int8 convs; other readers read float"})
    with atomic_output(out, force=force, inputs=[src]) as tmp:
        onnx.save(derived, str(tmp))
    return OpenVinoInt8(out, check, rewired, change, src.name)
