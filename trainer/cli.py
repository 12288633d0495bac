"""`paragon-train`: train a ParagonSR2 generator from a YAML config with `-o key=value` overrides."""

from __future__ import annotations

import click

from paragon_export.errors import ParagonError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (keys as in trainer/configs/*.yaml); defaults are used where absent.")
@click.option("-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. -o train.steps=2000 -o data.hr_dir=photos/ (repeatable).")
@click.option("--out-dir", default=None, help="Run folder (checkpoints, metrics.jsonl); overrides out_dir.")
@click.option("--resume", is_flag=True, help="Continue the run in out_dir from its latest checkpoint.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@click.option("--evaluate", "evaluate_ckpt", type=click.Path(dir_okay=False), default=None,
              help="Only evaluate this checkpoint on val.hr_dir (default: the held-out photos) and print "
                   "a Markdown table of Y-PSNR/SSIM: bicubic, dynamic, static (unfused), fused.")
def main(config_path, overrides, out_dir, resume, print_config, evaluate_ckpt) -> None:
    """Train ParagonSR2 (single process, or DDP under torchrun when WORLD_SIZE > 1)."""
    try:
        from .config import load_config

        cfg = load_config(config_path, list(overrides) + ([f"out_dir={out_dir}"] if out_dir else []))
        if print_config:
            import yaml

            click.echo(yaml.safe_dump(cfg, sort_keys=False))
            return
        if evaluate_ckpt:
            _evaluate(evaluate_ckpt, cfg)
            return
        from .loop import train

        train(cfg, resume=resume)
    except ParagonError as e:
        raise click.ClickException(str(e)) from None


def _evaluate(path: str, cfg: dict) -> None:
    import json

    import torch

    from paragon_export.checkpoint import load_model

    from .validate import evaluate, format_table, val_pairs

    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    loaded = load_model(path)
    if loaded.fused:
        raise ParagonError(f"{path} is fused; evaluate the unfused checkpoint (dynamic kernels are needed)")
    result = evaluate(loaded.model, val_pairs(cfg["val"]["hr_dir"], loaded.scale, cfg["val"]["max_lr_size"]))
    click.echo(format_table(result))
    click.echo(json.dumps(result["mean"]))
