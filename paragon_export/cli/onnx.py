from pathlib import Path

import click

from ..images import parse_sizes
from .options import force_option, output_option, scale_option, variant_option


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items())


@click.command("onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@output_option("Folder for {variant}_x{scale}_{fp32|fp16}_op{opset}.onnx (community: {scale}x_{name}_...).",
               flag="--output-dir", dest="out_dir")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset, 13-20.")
@click.option("--fp16", is_flag=True, help="Also write an FP16 graph (fp32 inputs/outputs).")
@click.option("--fp16-io", is_flag=True, help="With --fp16: make the FP16 graph's input and output float16 too.")
@click.option("--fp16-min-psnr", type=float, metavar="DB",
              help="FP16 gate: PSNR vs the FP32 ONNX on ORT CPU (default 60 dB).")
@click.option("--exporter", default="torchscript", show_default=True,
              help="torchscript or dynamo (dynamo needs onnxscript).")
@click.option("--static-shape", metavar="HxW", help="Bake this LR input size in (batch stays dynamic).")
@click.option("--profile", type=click.Choice(["default", "community"]), default="default", show_default=True,
              help="community: batch 1, dynamic H/W, fp32 + fp16 with fp16 I/O, named 2x_<name>_fp16.onnx "
                   "(what chaiNNer and VideoJaNai-style TensorRT frontends load as they are).")
@variant_option()
@scale_option()
@force_option()
def command(checkpoint, out_dir, opset, fp16, fp16_io, fp16_min_psnr, exporter, static_shape, profile, variant,
            scale, force):
    """Export CHECKPOINT (fused or not) to verified, simplified ONNX."""
    from ..errors import ParagonError
    from ..export_onnx import export_onnx
    from ..export_recipe import ExportRecipe
    from ..fp16 import Fp16Verification
    from ..verify import ToleranceCheck

    shape = None
    if static_shape:
        sizes = parse_sizes(static_shape)
        if len(sizes) != 1:
            raise ParagonError(f"--static-shape takes one HxW, got {static_shape!r}")
        shape = sizes[0]
    recipe = ExportRecipe(opset=opset, exporter=exporter, static_shape=shape, fp16=fp16, fp16_io=fp16_io,
                          fp16_target_psnr=fp16_min_psnr, profile=profile)
    arts = export_onnx(checkpoint, out_dir, recipe, variant=variant, scale=scale, force=force)
    a = arts["fp32"]
    md, m = a.meta["metadata"], a.meta
    click.echo(f"{md['variant']} x{md['scale']} ({md['upsampler']}), {md['exporter']} exporter, opset {md['opset']}, "
               f"input {md['input_shape']}")
    if m["fusion"]:
        click.echo(f"fused the checkpoint first: exactness max abs {m['fusion']['exactness_max_abs']:.2e} [limit 1e-5]")
    s = m["simplify"]
    before, after = sum(m["nodes_before"].values()), sum(m["nodes_after"].values())
    click.echo(f"simplified with {s['simplifier']}: {before} -> {after} nodes"
               + (f" ({s['reason']})" if s["reason"] else ""))
    click.echo(f"  before: {_counts(m['nodes_before'])}")
    click.echo(f"  after:  {_counts(m['nodes_after'])}")
    v = ToleranceCheck.from_json(m["verification"])
    click.echo(f"verified fp32 (ORT CPU vs fused PyTorch on real photos, max abs, limit {v.atol:g}): {v.describe()}")
    if "fp16" in arts:
        f = arts["fp16"].meta
        kept = f["fp16"]["kept_fp32"]
        click.echo(f"fp16: {len(kept)} node(s) kept fp32"
                   + (": " + "; ".join(f"{k} ({r})" for k, r in kept.items()) if kept else "")
                   + f" [activation peak {f['fp16']['activation_peak']:.3g} on {f['fp16']['calibration_images']} "
                     "calibration photos]")
        fv = Fp16Verification.from_json(f["verification"])
        click.echo(fv.line())
        if f["fp16"]["error_blocking"]:
            click.echo(f"  fp16 error blocking {f['fp16']['error_blocking']}")
        if fv.below_target:
            click.echo(f"  warning: fp16 arithmetic below the {fv.target_psnr:g} dB target: "
                       f"{', '.join(fv.below_target)} (above the {fv.arith_floor_psnr:g} dB floor; "
                       "ORT CPU hides this, an fp16 GPU engine will show it)")
    for art in arts.values():
        click.echo(f"wrote {art.path} ({art.path.stat().st_size / 1024:.0f} KiB)")
