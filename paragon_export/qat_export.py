"""Q/DQ ONNX export of a ModelOpt fake-quant model (TorchScript exporter, dynamic batch/H/W, onnxsim
only when it keeps every Q/DQ), its TensorRT checks, and its verification on ONNX Runtime."""

from __future__ import annotations

import torch

from .errors import ParagonError
from .qat_result import ExportInfo, QATVerification
from .verify import VERIFY_THREADS, Verification, compare_groups, run_onnx, verification_inputs, verify_against

TRACE_SHAPE = (2, 3, 40, 56)  # a size no verification uses: a shape baked in at trace time cannot pass


def _per_channel_form(model) -> int:
    """ModelOpt writes a one-element weight scale as a scalar (per-tensor); when the weight's
    output-channel axis has length 1 (the depthwise Magic ConvTranspose) that is the same as
    per-channel, so write it in per-channel form (1-D scale on that axis), as ORT's PTQ does."""
    from onnx import helper, numpy_helper

    from .int8_check import WEIGHTED_OPS

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    fixed = 0
    for n in g.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        dq = producer.get(n.input[1])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue
        axis = WEIGHTED_OPS[n.op_type]
        weight = numpy_helper.to_array(inits[q.input[0]])
        names = {dq.input[1], dq.input[2], q.input[1], q.input[2]}
        if weight.shape[axis] != 1 or not all(k in inits and not inits[k].dims for k in names):
            continue
        for k in names:
            arr = numpy_helper.to_array(inits[k]).reshape(1)
            inits[k].CopyFrom(numpy_helper.from_array(arr, k))
        for node in (q, dq):
            for a in list(node.attribute):
                if a.name == "axis":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("axis", axis))
        fixed += 1
    if fixed:  # recorded shapes of the rewritten constants are stale; the checker re-infers them
        del g.value_info[:]
    return fixed


def export_qdq(student: torch.nn.Module, *, opset: int = 17) -> tuple[object, ExportInfo]:
    """Student (fake quant) -> simplified Q/DQ ONNX proto with dynamic batch/height/width, and info
    (node counts, simplifier, `int8_check.inspect_qdq` figures, TensorRT blockers)."""
    import io
    import warnings

    import onnx

    from .int8_check import inspect_qdq, trt_blockers
    from .onnx_graph import INPUT_NAME, OUTPUT_NAME, constants_to_initializers, name_nodes, op_counts, simplify

    student.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter is the one that turns ModelOpt's fake quant into Q/DQ pairs.
        torch.onnx.export(student, (torch.zeros(TRACE_SHAPE),), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                        OUTPUT_NAME: {0: "batch", 2: "out_height", 3: "out_width"}})
    raw = onnx.load_from_string(buf.getvalue())
    before = op_counts(raw)
    graph, info = simplify(onnx.load_from_string(buf.getvalue()))
    after = op_counts(graph)
    qdq = ("QuantizeLinear", "DequantizeLinear")
    if any(after.get(k, 0) != before.get(k, 0) for k in qdq):
        info = {"simplifier": "none", "reason": f"simplification changed the Q/DQ counts "
                f"({[before.get(k, 0) for k in qdq]} -> {[after.get(k, 0) for k in qdq]}); kept the exported graph"}
        graph = raw
        constants_to_initializers(graph)
    per_channel_fixed = _per_channel_form(graph)
    name_nodes(graph)
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ParagonError(f"exported Q/DQ graph fails the ONNX checker: {str(e).splitlines()[0]}") from None
    checks = inspect_qdq(graph)
    return graph, ExportInfo(before, op_counts(graph), info, per_channel_fixed, trt_blockers(checks), checks)


def verify_qdq(model, student: torch.nn.Module, scale: int, sizes, *, paths=None) -> Verification:
    """ORT CPU (Q/DQ reference semantics, the same on every CPU) vs the torch fake-quant student on
    real photos: per size max abs, mean abs and PSNR (`verify.compare_groups`)."""
    return verify_against(model, student, scale, sizes, paths=paths)


def remainder_effect(plain, final, scale: int, sizes, *, paths=None) -> Verification:
    """What the float remainder's dtype alone changes: the shipped graph vs the same Q/DQ graph with
    an fp32 remainder, both on ONNX Runtime (`verify.compare_groups` figures). fp16 rounding before a
    QuantizeLinear moves values across rounding boundaries, which the fp32 fake-quant student cannot
    show, so this is measured apart from the export check."""
    from .onnx_graph import ort_session

    inputs = verification_inputs(scale, sizes, paths=paths)
    ref, ref_errors = run_onnx(ort_session(plain, threads=VERIFY_THREADS), inputs)
    out, errors = run_onnx(ort_session(final, threads=VERIFY_THREADS), inputs)
    return compare_groups(out, {k: v for k, v in ref.items()}, {**ref_errors, **errors})


# The fp16 remainder's rounding moves some values across a quantizer's rounding boundary; an
# overflow or a broken conversion shows as a far larger change (NaN, or PSNR near 0).
REMAINDER_MIN_PSNR = 30.0


def check_verification(v: QATVerification) -> None:
    """One line when the Q/DQ export disagrees with the student, or its fp16 remainder changes the
    output by more than rounding (each against its limit in `v`)."""
    if not v.min_psnr >= v.min_psnr_limit:
        raise ParagonError("the Q/DQ ONNX disagrees with the torch fake-quant model (PSNR "
                           f"{v.export.describe('psnr')}; limit {v.min_psnr_limit} dB); nothing written")
    rest = v.remainder
    if rest is not None and not rest.min_psnr >= v.remainder_min_psnr_limit:
        raise ParagonError("the fp16 remainder changes the Q/DQ model's output beyond rounding (PSNR vs an fp32 "
                           f"remainder {rest.describe('psnr')}; limit {v.remainder_min_psnr_limit} dB); nothing written")
