"""Why an int8 Q/DQ file fails on a runtime other than ONNX Runtime: measured on that runtime, not assumed.

A runtime that computes a Q/DQ file differently from the file's ONNX semantics is compared with
those semantics (ONNX Runtime's reference path, the same on every CPU) three ways:
- the file as it is;
- its weights narrowed to 7 bits (scales widened by 127/63): OpenVINO's documented remedy for u8s8
  saturation on CPUs without VNNI, so a file it fixes is breaking on that saturation;
- one int8 conv at a time, every other conv reading its float inputs: the convs that break the
  runtime on their own, named.
The verdict's reason is built from those measurements. Used by `parity` for a failing OpenVINO int8
row; `run` takes any Polygraphy runner factory, so the same bisection serves any runtime.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .metrics import psnr
from .onnx_graph import ort_session

WEIGHTED = ("Conv", "ConvTranspose")
NARROW = 63.0 / 127.0  # 7-bit weights: |q| <= 63, so u8 x s8 pairs cannot overflow int16
MAX_NAMED = 4  # breaking convs named in the one-line reason (the report lists them all)


def _producers(model: onnx.ModelProto) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def int8_convs(model: onnx.ModelProto) -> list[str]:
    """Convs whose activation input comes through a DequantizeLinear: the int8 convs of a Q/DQ file."""
    prod = _producers(model)
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED and n.input[0] in prod
            and prod[n.input[0]].op_type == "DequantizeLinear"]


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes (and initializers) nothing reads any more."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = outputs | {i for n in model.graph.node for i in n.input}
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def keep_int8(model: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """A copy in which only the int8 convs in `keep` stay int8: the others read the tensors their
    QuantizeLinear nodes quantized (activation and weight), i.e. run in the file's float dtype."""
    out = copy.deepcopy(model)
    prod = _producers(out)
    for node in out.graph.node:
        if node.op_type not in WEIGHTED or node.name in keep:
            continue
        for i in range(min(2, len(node.input))):
            dq = prod.get(node.input[i])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            node.input[i] = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else node.input[i]
    _prune(out)
    return out


def narrow_weights(model: onnx.ModelProto, factor: float = 1.0 / NARROW) -> onnx.ModelProto:
    """A copy whose weight Q/DQ scales are multiplied by `factor` (127/63: 7-bit weight values)."""
    out = copy.deepcopy(model)
    prod = _producers(out)
    inits = {i.name: i for i in out.graph.initializer}
    done = set()
    for node in out.graph.node:
        if node.op_type not in WEIGHTED or len(node.input) < 2:
            continue
        dq = prod.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = prod.get(dq.input[0])
        for name in {dq.input[1], *((q.input[1],) if q is not None and q.op_type == "QuantizeLinear" else ())}:
            if name in inits and name not in done:
                s = numpy_helper.to_array(inits[name])
                inits[name].CopyFrom(numpy_helper.from_array((s.astype(np.float64) * factor).astype(s.dtype), name))
                done.add(name)
    return out


def _min_psnr(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return float(min(psnr(np.clip(o, 0, 1), np.clip(r, 0, 1)) for o, r in zip(outs, refs)))


def _reference(model: onnx.ModelProto, feeds: list[dict]) -> list[np.ndarray]:
    sess = ort_session(model.SerializeToString(), threads=1)
    return [sess.run(None, dict(f))[0] for f in feeds]


def _on_runtime(model: onnx.ModelProto, make_runner: Callable, feeds: list[dict], folder: Path, tag: str):
    path = folder / f"{tag}.onnx"
    onnx.save(model, str(path))
    with make_runner(path) as runner:
        return [np.asarray(next(iter(runner.infer(dict(f), check_inputs=False).values()))) for f in feeds]


def diagnose(path: Path | str, make_runner: Callable, feeds: list[dict], min_psnr: float,
             runtime: str = "OpenVINO") -> Diagnosis:
    """Bisect why `runtime` (a Polygraphy runner from `make_runner(path)`) fails the int8 file at
    `path`: PSNR of each variant on the runtime vs its own Q/DQ reference semantics, min over `feeds`."""
    model = onnx.load(str(path))
    convs = int8_convs(model)

    def measure(variant: onnx.ModelProto, tag: str) -> float:
        return _min_psnr(_on_runtime(variant, make_runner, feeds, folder, tag), _reference(variant, feeds))

    with tempfile.TemporaryDirectory(prefix="paragon-diagnose-") as tmp:
        folder = Path(tmp)
        whole = measure(model, "whole")
        narrow = measure(narrow_weights(model), "narrow")
        alone = {name: measure(keep_int8(model, {name}), f"only{k}") for k, name in enumerate(convs)}
    return Diagnosis(runtime, min_psnr, whole, narrow, alone)


def _db(v: float) -> str:
    return "identical" if v == float("inf") else f"{v:.1f} dB"


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` measured: PSNR on the runtime vs the file's own Q/DQ semantics, of the file, of
    the file with 7-bit weights and of the file with each int8 conv alone left int8 (node -> PSNR)."""

    runtime: str
    min_psnr: float
    psnr_vs_reference: float
    narrow_weights_psnr: float
    alone: dict[str, float]

    @property
    def breaking(self) -> list[str]:
        """The convs that fail the limit on their own, worst first."""
        return sorted((n for n, p in self.alone.items() if p < self.min_psnr), key=self.alone.__getitem__)

    @property
    def weight_saturation(self) -> bool:
        return self.psnr_vs_reference < self.min_psnr <= self.narrow_weights_psnr

    def reason(self) -> str:
        """One line from the measurements."""
        rt, lim = self.runtime, self.min_psnr
        head = f"{rt} vs this file's own Q/DQ semantics: {_db(self.psnr_vs_reference)}"
        if self.psnr_vs_reference >= lim:
            return head + f" (>= {lim:g} dB: {rt} computes the file as written; the int8 error itself fails the limit)"
        if self.weight_saturation:
            return (head + f"; with 7-bit weights {_db(self.narrow_weights_psnr)}: u8s8 saturation of 8-bit weights "
                    "(CPUs without VNNI)")
        parts = [head, f"7-bit weights (the u8s8-saturation remedy) {_db(self.narrow_weights_psnr)}: "
                       "not weight saturation"]
        bad = self.breaking
        if bad:
            named = ", ".join(f"{n} ({_db(self.alone[n])})" for n in bad[:MAX_NAMED])
            more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
            parts.append(f"{len(bad)} of {len(self.alone)} int8 convs break it on their own: {named}{more}")
        else:
            parts.append(f"no int8 conv breaks it on its own ({len(self.alone)} tried): the errors add up")
        return "; ".join(parts)
