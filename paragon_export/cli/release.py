from pathlib import Path

import click

from ..release import DEFAULT_PRECISIONS, release
from .options import force_option, output_option, scale_option


@click.command("release")
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@output_option("Release folder.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration images (default: bundled sample photos).")
@click.option("--precisions", default=",".join(DEFAULT_PRECISIONS), show_default=True,
              help="fp32 plus any of fp16, int8, qat.")
@click.option("--engine/--no-engine", default=None,
              help="Build TensorRT engines (default: only where TensorRT and a GPU exist).")
@click.option("--ncnn/--no-ncnn", default=None,
              help="Write NCNN .param/.bin pairs (default: when pnnx and ncnn are installed, the [ncnn] extra).")
@scale_option()
@force_option("Release into a non-empty folder that has no manifest.")
def command(checkpoint, output, calib, precisions, engine, ncnn, scale, force):
    """Fuse, export, quantize, verify (and build engines): everything a release needs, in one folder.

    Without CHECKPOINT the embedded trained default model is released."""
    precs = tuple(p.strip() for p in precisions.split(",") if p.strip())
    release(checkpoint, output, calib=calib, precisions=precs, engine=engine, scale=scale, force=force,
            progress=click.echo, ncnn=ncnn)
    click.echo(f"release ready: {output}/manifest.json, {output}/MODEL_CARD.md, {output}/parity/parity.md")
