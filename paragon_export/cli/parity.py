from pathlib import Path

import click

from ..parity import DEFAULT_SIZES, parity
from .options import force_option, output_option


@click.command("parity")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option("Report folder to write (parity.json, parity.md, crops/*.png).")
@click.option("--ref", type=click.Path(path_type=Path),
              help="Reference checkpoint (default: the first .safetensors/.pth among ARTIFACTS).")
@click.option("--images", type=click.Path(path_type=Path),
              help="Folder of HR photos (default: bundled held-out photos). LR = bicubic of centre crops.")
@click.option("--sizes", default=DEFAULT_SIZES, show_default=True, help="LR crop sizes HxW, comma separated.")
@click.option("--atol", type=float, help="Max-abs limit for every artifact (overrides the per-precision table).")
@click.option("--min-psnr", type=float, help="Minimum PSNR (dB) vs the reference for every artifact.")
@click.option("--localize", is_flag=True, help="For failing ONNX artifacts, name the first layer whose error jumps.")
@force_option("Overwrite an existing report folder.")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(["openvino"]),
              help="Extra runtimes to add rows for (default: every extra runtime that can run the artifact).")
@click.option("--require-runtime", "require", multiple=True, type=click.Choice(["openvino"]),
              help="Make this runtime's rows gate the exit code (a missing package is then an error).")
@click.pass_context
def command(ctx, artifacts, output, ref, images, sizes, atol, min_psnr, localize, force, runtimes, require):
    """Compare ARTIFACTS (.safetensors/.pth, .onnx, .engine) with the fp32 PyTorch reference on real images.

    Every .onnx also runs on OpenVINO (when installed) as a compatibility row with the same limits.
    Exits 0 only if every gated row is within its precision's limits (skipped engines do not fail)."""
    report = parity(list(artifacts), output, ref=ref, images=images, sizes=sizes, atol=atol, min_psnr=min_psnr,
                    localize=localize, force=force, runtimes=tuple(runtimes) + tuple(require) or None,
                    require=tuple(require))
    click.echo(report.markdown())
    click.echo(f"wrote {output}/parity.json, parity.md and {len(report.outputs.pngs)} PNGs")
    if not report.passed:
        ctx.exit(1)
