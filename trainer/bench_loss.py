"""Step-time overhead of enabling a loss: `python -m paragon_export.trainer.bench_loss -c CONFIG
--add loss.clip=0.1 [-o KEY=VALUE ...]`.

Two generator-loss stacks, the config's and the config's plus `--add`, train the same model on the
same batches in round-robin (so machine load drifts hit both alike); each full training step
(forward, losses, backward, optimizer) is timed in process CPU time. Prints the median step times
and their ratio. No discriminator step (an R3GAN term is timed only on the generator side).
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from paragon_export.errors import ParagonError


def _step(model, opt, loss_fn, lr, hr, disc) -> float:
    t0 = time.process_time()
    sr = model(lr)
    loss, _ = loss_fn(sr.float(), hr, lr=lr, disc=disc)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.process_time() - t0


def measure(cfg: dict, added: dict, steps: int, warmup: int) -> dict:
    from paragon_export.arch import build

    from .data import PatchBatches
    from .losses import GeneratorLoss

    torch.set_num_threads(int(cfg["threads"]) or torch.get_num_threads())
    torch.manual_seed(cfg["seed"])
    mc = cfg["model"]
    model = build(mc["variant"], scale=mc["scale"], upsampler=mc["upsampler"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    base_cfg = {**cfg["loss"], "gan_start": 0}
    stacks = {"base": GeneratorLoss(base_cfg), "added": GeneratorLoss({**base_cfg, **added})}
    disc = None
    if float(cfg["loss"]["gan"]) > 0 or float(added.get("gan", 0)) > 0:
        from paragon_export.arch.munet import MUNet

        disc = MUNet(in_chans=3, base_channels=cfg["discriminator"]["base_channels"]).requires_grad_(False)
    ds = PatchBatches(cfg["data"], mc["scale"], seed=cfg["seed"])
    times: dict[str, list[float]] = {k: [] for k in stacks}
    for i in range(warmup + steps):
        lr, hr = ds[i]
        for name, loss_fn in (stacks.items() if i % 2 == 0 else reversed(stacks.items())):
            t = _step(model, opt, loss_fn, lr, hr, disc)
            if i >= warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"base_s": med["base"], "added_s": med["added"], "ratio": med["added"] / med["base"],
            "steps": steps, "threads": torch.get_num_threads(),
            "batch": list(lr.shape), "torch": torch.__version__}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override (both stacks).")
@click.option("--add", "added", multiple=True, required=True, metavar="loss.KEY=VALUE",
              help="Loss setting of the second stack only, e.g. --add loss.clip=0.1 (repeatable).")
@click.option("--steps", default=10, show_default=True, help="Timed steps per stack.")
@click.option("--warmup", default=2, show_default=True, help="Untimed steps per stack first.")
def main(config_path, overrides, added, steps, warmup) -> None:
    """Median CPU step time with and without a loss, and their ratio."""
    import json

    try:
        from .config import load_config, parse_override

        bad = [t for t in added if not parse_override(t)[0].startswith("loss.")]
        if bad:
            raise ParagonError(f"--add takes loss.* settings, got {bad[0]!r}")
        base = load_config(config_path, overrides)
        more = load_config(config_path, list(overrides) + list(added))
        extra = {k: v for k, v in more["loss"].items() if v != base["loss"][k]}
        click.echo(json.dumps(measure(base, extra, steps, warmup)))
    except ParagonError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
