from pathlib import Path

import click

from .options import (calibration_fields, calibration_options, force_option, option_group, output_option, scale_option,
                      threads_option, variant_option)


def _recipe(method, target_psnr, max_drop, node_budget, no_bias_correction, remainder, **calibration):
    from ..int8_recipe import Int8Recipe

    return Int8Recipe(method=method, target_psnr=target_psnr,
                      max_drop=max_drop if max_drop is None or max_drop >= 0 else None, node_budget=node_budget,
                      bias_correction=not no_bias_correction, remainder=remainder, **calibration_fields(**calibration))


RECIPE_OPTIONS = [
    click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="percentile",
                 show_default=True, help="Activation range calibration."),
    click.option("--target-psnr", type=float, help="Required PSNR of int8 against fp32 on held-out images (dB)."),
    click.option("--max-drop", type=float, default=0.10, show_default=True,
                 help="Largest allowed held-out Y-PSNR drop against fp32 (dB); a negative value disables it."),
    click.option("--node-budget", type=int, help="Most nodes to keep in float (default: 40% of the quantizable nodes)."),
    *calibration_options(crops=True),
    click.option("--no-bias-correction", is_flag=True,
                 help="Keep the biases as trained (default: correct them for the int8 weights' mean error)."),
    click.option("--remainder", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
                 help="dtype of the nodes left unquantized (fp16: what a strongly typed TensorRT engine runs fast; "
                      "nodes whose activations overflow fp16 stay fp32)."),
]


@click.command("int8")
@click.argument("model", type=click.Path(path_type=Path))
@output_option("Folder for <variant>_x<s>_int8_op<N>.onnx and its _report.json.", dest="out_dir")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path),
              help="Calibration image folder (HR photos; split by image into calibration and held-out). "
                   "Default: the bundled sample photos.")
@option_group("recipe", _recipe, RECIPE_OPTIONS)
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Calibration cache folder "
              "(default: $PARAGON_EXPORT_CACHE or ~/.cache/paragon-export/calibration).")
@click.option("--no-peer", is_flag=True, help="Skip the original deploy recipe's comparison row.")
@click.option("--cpu", is_flag=True,
              help="Also make a separate int8 file for ONNX Runtime's own CPU kernels (..._int8_cpu_<isa>...): "
                   "written only if on this CPU it is >= 1.2x faster than fp32 and >= 40 dB from it; "
                   "the figures and the decision go to its _report.json either way.")
@threads_option()
@variant_option("Expected variant, for checkpoint input.")
@scale_option("Upscale factor (checked against the model).")
@click.option("--openvino", is_flag=True,
              help="Also write <stem>_openvino.onnx: the INT8 file for OpenVINO (needs openvino; the TensorRT file "
                   "is unchanged).")
@force_option()
def command(model, out_dir, calib_dir, recipe, cache_dir, no_peer, cpu, threads, variant, scale, openvino, force):
    """Quantize MODEL (FP32 .onnx or checkpoint) to TensorRT-compatible Q/DQ INT8 and prove it on held-out photos."""
    from ..int8 import quantize_int8

    if openvino:  # before the quantization, not after it
        from ..errors import ParagonError
        from ..runners import runtime_unavailable

        if runtime_unavailable("openvino"):
            raise ParagonError(f"--openvino: {runtime_unavailable('openvino')}")
    report = quantize_int8(model, out_dir, recipe, calib_dir=calib_dir, cache_dir=cache_dir, peer=not no_peer,
                           threads=threads, variant=variant, scale=scale, force=force,
                           progress=lambda m: click.echo(m, err=True))
    click.echo(report.table())
    if report.mixed_precision.kept_float:
        click.echo(f"kept in float: {', '.join(report.mixed_precision.kept_float)}")
    click.echo(f"wrote {report.path} and {report.report_path}")
    if openvino:
        from ..int8_openvino import write_openvino_int8

        ov = write_openvino_int8(report.path, out_dir, force=force)
        click.echo(f"wrote {ov.path} (for OpenVINO; OpenVINO vs its Q/DQ semantics: {ov.check.figures()})")
    if cpu:
        from ..int8_cpu import cpu_int8

        res = cpu_int8(model, out_dir, recipe, calib_dir=calib_dir, cache_dir=cache_dir, measure_all=True, force=force,
                       variant=variant, scale=scale,
                       progress=lambda m: click.echo(m, err=True))
        click.echo(res.record.line())
