from pathlib import Path

import click

from ..fuse import EXACT_ATOL, fuse
from .options import force_option, output_option, scale_option, variant_option


@click.command("fuse")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@output_option("Fused .safetensors to write.")
@variant_option()
@scale_option()
@click.option("--calibrate-kernels", "calibrate", type=click.Path(path_type=Path),
              help="Image folder: set every tracked kernel to its mean generated kernel over these images.")
@click.option("--hr", "hr_dir", type=click.Path(path_type=Path),
              help="HR image folder for the Y-PSNR gap figures (default: bundled held-out photos).")
@force_option("Overwrite an existing output.")
def command(checkpoint, output, variant, scale, calibrate, hr_dir, force):
    """Fuse CHECKPOINT for release and verify the fusion."""
    art, r = fuse(checkpoint, output, variant=variant, scale=scale, calibrate_dir=calibrate, hr_dir=hr_dir, force=force)
    g = r.gap
    click.echo(f"{r.variant} x{r.scale} ({r.upsampler}): params {r.params_before:,} -> {r.params_after:,}")
    if r.skipped_images:
        click.echo(f"warning: skipped {len(r.skipped_images)} image(s): {'; '.join(r.skipped_images)}", err=True)
    if r.calibrated_images:
        click.echo(f"kernels calibrated on {r.calibrated_images} images")
    sizes = ", ".join(f"{k}: {v:.2e}" for k, v in r.exactness.items())
    click.echo(f"exactness fused vs unfused static (max abs): {sizes}  [limit {EXACT_ATOL:g}]")
    click.echo(f"dynamic->static gap: PSNR fused vs dynamic {g.psnr_fused_vs_dynamic:.2f} dB; "
               f"Y-PSNR vs HR ({g.hr_source}, {g.images} images): dynamic {g.y_psnr_dynamic:.2f} dB, "
               f"fused {g.y_psnr_fused:.2f} dB")
    click.echo(f"wrote {art.path}")
