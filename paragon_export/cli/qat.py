from pathlib import Path

import click

from ..qat_recipe import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_PATCH, DEFAULT_STEPS
from .options import calibration_fields, calibration_options, force_option, option_group, output_option, threads_option


def _recipe(steps, lr, batch, patch, gt_weight, magic, eval_every, save_every, **calibration):
    from ..qat_recipe import QATRecipe

    return QATRecipe(steps=steps, lr=lr, batch=batch, patch=patch, gt_weight=gt_weight, magic=magic,
                     eval_every=eval_every, save_every=save_every, **calibration_fields(**calibration))


RECIPE_OPTIONS = [
    click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True, help="Total fine-tuning steps."),
    click.option("--lr", type=float, default=DEFAULT_LR, show_default=True, help="Adam learning rate (cosine-decayed to 0)."),
    click.option("--batch", type=int, default=DEFAULT_BATCH, show_default=True, help="Patches per step."),
    click.option("--patch", type=int, default=DEFAULT_PATCH, show_default=True, help="LR patch size in pixels."),
    click.option("--gt-weight", type=float, default=0.0, show_default=True,
                 help="Weight of an extra L1 loss to the HR ground truth (0: pure distillation to the fp32 model)."),
    click.option("--magic", type=click.Choice(["float", "int8"]), default="int8", show_default=True,
                 help="int8: the Magic-Conv resampling ConvTranspose in int8 (its depthwise 1x7/7x1 sharpen convs "
                      "have no TensorRT int8 kernel and stay fp16); float: all three fp16."),
    click.option("--eval-every", type=int, default=50, show_default=True, help="Steps between held-out PSNR checks."),
    click.option("--save-every", type=int, default=50, show_default=True, help="Steps between resumable state saves."),
    *calibration_options(),
]


@click.command("qat")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="HR photo folder: calibration crops, training patches and (split by image) held-out images. "
                   "Default: the bundled sample photos (held-out: astronaut, chelsea, coffee, rocket).")
@output_option("Folder for the Q/DQ ONNX, qat_report.json and the resumable qat_state.*", dest="out_dir")
@option_group("recipe", _recipe, RECIPE_OPTIONS)
@click.option("--no-ptq", is_flag=True, help="Skip the PTQ baseline (the int8 command on the same data).")
@threads_option()
@click.option("--train-threads", type=int, help="torch CPU threads for training (default: torch's own choice).")
@click.option("--resume", is_flag=True, help="Continue the run saved in the output folder.")
@force_option("Overwrite existing outputs (and start over from a saved run).")
def command(checkpoint, data_dir, out_dir, recipe, no_ptq, threads, train_threads, resume, force):
    """Quantization-aware fine-tuning of CHECKPOINT with NVIDIA ModelOpt, exported as Q/DQ INT8 ONNX."""
    from ..qat import qat

    art, report = qat(checkpoint, out_dir, recipe, data_dir=data_dir, resume=resume, force=force,
                      ptq_baseline=not no_ptq, threads=threads, train_threads=train_threads,
                      progress=lambda m: click.echo(m, err=True))
    t = report.training
    click.echo(f"QAT: {t.steps_this_run} steps this run ({t.steps} in all) in {t.train_seconds:.0f} s "
               f"({t.seconds_per_step:.2f} s/step); wall {report.wall_seconds:.0f} s")
    click.echo(report.table())
    click.echo(f"wrote {art.path} and {report.output.report}")
