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
def main(config_path, overrides, out_dir, resume, print_config) -> None:
    """Train ParagonSR2 (single process, or DDP under torchrun when WORLD_SIZE > 1)."""
    try:
        from .config import load_config

        cfg = load_config(config_path, list(overrides) + ([f"out_dir={out_dir}"] if out_dir else []))
        if print_config:
            import yaml

            click.echo(yaml.safe_dump(cfg, sort_keys=False))
            return
        from .loop import train

        train(cfg, resume=resume)
    except ParagonError as e:
        raise click.ClickException(str(e)) from None
