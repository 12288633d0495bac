from pathlib import Path

import click

from ..runners import ALL_RUNTIMES
from ..upscale import ALPHA_MODES, DEFAULT_OVERLAP, DEFAULT_TILE, upscale
from .options import force_option, output_option, scale_option, threads_option


@click.command("upscale")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option("Output folder (or an image file when INPUT is one image).")
@click.option("--tile", default=DEFAULT_TILE, show_default=True, type=int,
              help="Tile size in input pixels; 0 runs each image whole.")
@click.option("--overlap", default=DEFAULT_OVERLAP, show_default=True, type=int,
              help="Overlap between neighbouring tiles in input pixels (blended; keep it >= 4x what "
                   "the network's padding reaches for exact results).")
@click.option("--alpha", "alpha", type=click.Choice(ALPHA_MODES), default="bicubic", show_default=True,
              help="How the alpha channel is upscaled.")
@threads_option("CPU threads for torch/onnxruntime.", default=None)
@scale_option()
@click.option("--runtime", type=click.Choice(ALL_RUNTIMES),
              help="Runtime for ARTIFACT (default: torch for checkpoints, onnxruntime for .onnx; openvino runs an .onnx).")
@force_option()
def command(artifact, inputs, output, tile, overlap, alpha, threads, scale, runtime, force):
    """Upscale images or folders (recursively) with ARTIFACT: a checkpoint, an ONNX model, a TensorRT engine or an NCNN .param."""
    records = upscale(artifact, list(inputs), output, tile=tile, overlap=overlap, alpha=alpha, threads=threads,
                      scale=scale, force=force, runtime=runtime)
    for r in records:
        extra = "".join(f", {k}" for k in ("alpha", "gray") if r[k]) + (", 16-bit" if r["bits"] == 16 else "")
        click.echo(f"{r['input']} -> {r['output']} ({r['size_out'][1]}x{r['size_out'][0]}, "
                   f"{r['tiles']} tile{'s' if r['tiles'] != 1 else ''}{extra})")
