from pathlib import Path

import click


@click.command("ncnn")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output-dir", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for {variant}_x{scale}_{fp32|fp16}.param/.bin/.json.")
@click.option("--no-fp16", is_flag=True, help="Write only the fp32 pair (default: fp32 and fp16 storage).")
@click.option("--scale", type=int, help="Upscale factor, for a checkpoint or ONNX that does not record it.")
@click.option("--force", is_flag=True, help="Overwrite outputs this toolkit wrote.")
def command(model, out_dir, no_fp16, scale, force):
    """Convert MODEL (a checkpoint, fused or not, or an fp32 ONNX) to verified NCNN .param/.bin through pnnx."""
    from ..ncnn_export import export_ncnn
    from ..verify import Verification

    arts = export_ncnn(model, out_dir, precisions=("fp32",) if no_fp16 else ("fp32", "fp16"), scale=scale,
                       force=force)
    first = next(iter(arts.values())).meta
    click.echo(f"{first['variant']} x{first['scale']} ({first['upsampler']}): {first['converter']['route']} "
               f"(pnnx {first['converter']['pnnx']})")
    for p, art in arts.items():
        v = art.meta["verification"]
        click.echo(f"verified {p} (ncnn CPU vs {v['reference']}, max abs, limit {v['limits']['max_abs']:g}): "
                   f"{Verification.from_json(v).describe()}")
    for art in arts.values():
        size = art.path.stat().st_size + art.path.with_suffix(".bin").stat().st_size
        click.echo(f"wrote {art.path} + {art.path.with_suffix('.bin').name} ({size / 1024:.0f} KiB)")
