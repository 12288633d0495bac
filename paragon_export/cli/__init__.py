"""`paragon-export` command line. Each subcommand lives in its own module and only calls the API;
modules are imported on use so `--help` stays fast and optional dependencies stay optional."""

from __future__ import annotations

import importlib
import os

import click

from ..errors import ParagonError

# name -> module under paragon_export.cli defining a click command called `command`
COMMANDS = {
    "fuse": "fuse",
    "onnx": "onnx",
    "int8": "int8",
    "qat": "qat",
    "upscale": "upscale",
    "bench": "bench",
    "engine": "engine",
    "parity": "parity",
    "release": "release",
}

# upscale and bench have --threads; the rest only verify on small crops.
SINGLE_THREAD = {"fuse", "onnx", "int8", "qat", "parity", "release", "engine"}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"{__name__}.{COMMANDS[name]}").command

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if name in SINGLE_THREAD and "OMP_NUM_THREADS" not in os.environ:
            # These commands run torch on small verification crops, where extra OpenMP threads only
            # add overhead, and spin-wait badly on a busy machine (fuse: 5 s on 1 thread vs 37 s on 2).
            import torch

            torch.set_num_threads(1)
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ParagonError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_LazyGroup)
@click.version_option(package_name="paragon-export")
def main() -> None:
    """Ship ParagonSR2 super-resolution models: fused weights, verified ONNX, INT8, engines, parity."""
