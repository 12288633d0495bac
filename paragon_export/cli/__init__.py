"""`paragon-export` command line. Each subcommand lives in its own module and only calls the API;
modules are imported on use so `--help` stays fast and optional dependencies stay optional."""

from __future__ import annotations

import errno
import functools
import importlib
import os
from pathlib import Path

import click

from ..errors import ParagonError

# name -> module under paragon_export.cli defining a click command called `command`
COMMANDS = {
    "fuse": "fuse",
    "onnx": "onnx",
    "ncnn": "ncnn",
    "int8": "int8",
    "qat": "qat",
    "upscale": "upscale",
    "bench": "bench",
    "engine": "engine",
    "parity": "parity",
    "release": "release",
}

# Disk full or quota exceeded anywhere in a command: one line naming the file, not a traceback.
_ONE_LINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

# upscale and bench have --threads; the rest only verify on small crops.
SINGLE_THREAD = {"fuse", "onnx", "ncnn", "int8", "qat", "parity", "release", "engine"}


# Parameters that name what a command writes; every other path parameter is an input.
OUTPUT_PARAMS = ("output", "out_dir", "json_path")


def _guarded(cmd: click.Command) -> click.Command:
    """Before any command runs: no output path may be one of its input paths (`fuse X -o X`,
    `upscale DIR -o DIR`), with or without --force. Writers check again, file by file."""
    if getattr(cmd, "_paragon_guarded", False):
        return cmd
    callback = cmd.callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        from ..artifact import refuse_inputs
        from .options import check

        check(kwargs)

        paths = lambda v: [p for p in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(p, Path)]  # noqa: E731
        inputs = [p for k, v in kwargs.items() if k not in OUTPUT_PARAMS for p in paths(v)]
        outputs = [out for k in OUTPUT_PARAMS for out in paths(kwargs.get(k))]
        for out in outputs:
            refuse_inputs(out, inputs, contains=False)
        new = [_first_missing(out) for out in outputs if not out.exists()]
        try:
            return callback(*args, **kwargs)
        except BaseException:
            for out in new:
                _remove_if_empty(out)
            raise

    cmd.callback = run
    cmd._paragon_guarded = True
    return cmd


def _first_missing(path: Path) -> Path:
    """The top folder a command would create for `path` (`-o a/b/c` with no `a`: `a`)."""
    path = Path(os.path.abspath(path))
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_if_empty(folder: Path) -> None:
    """A failed command leaves no output folder it created that holds nothing but our bookkeeping."""
    import shutil

    from ..ownership import hidden_own

    if not folder.is_dir() or folder.is_symlink():
        return
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not hidden_own(d)]  # our temps go with the folder
        if any(not hidden_own(f) for f in files):
            return
    shutil.rmtree(folder, ignore_errors=True)


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return _guarded(importlib.import_module(f"{__name__}.{COMMANDS[name]}").command)

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if name in SINGLE_THREAD and "OMP_NUM_THREADS" not in os.environ:
            # These commands run torch on small verification crops, where extra OpenMP threads only
            # add overhead, and spin-wait badly on a busy machine (README: measured figures).
            import torch

            torch.set_num_threads(1)
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ParagonError as e:
            raise click.ClickException(str(e)) from None
        except MemoryError:
            raise click.ClickException("out of memory: the sizes, tile or batch asked for do not fit in this "
                                       "machine's RAM; use smaller sizes (or --tile for upscale)") from None
        except OSError as e:
            if e.errno not in _ONE_LINE_ERRNOS:
                raise
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}: free space or choose another output") from None


@click.group(cls=_LazyGroup)
@click.version_option(package_name="paragon-export")
def main() -> None:
    """Ship ParagonSR2 super-resolution models: fused weights, verified ONNX, INT8, engines, parity."""
