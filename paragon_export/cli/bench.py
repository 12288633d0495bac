from pathlib import Path

import click

from ..bench import bench
from ..images import parse_sizes
from ..runners import ALL_RUNTIMES
from .options import force_option, threads_option


@click.command("bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--sizes", default="256x256", show_default=True, help="LR input sizes, HxW[,HxW...].")
@threads_option("CPU threads for torch and onnxruntime (default: all usable cores).", default=None)
@click.option("--runs", default=20, show_default=True, type=int, help="Timed runs per artifact and size.")
@click.option("--warmup", default=3, show_default=True, type=int, help="Untimed runs first.")
@click.option("--baseline", type=click.Path(path_type=Path),
              help="PyTorch checkpoint for the eager reference (default: the first unfused checkpoint given).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@force_option("Overwrite an existing JSON report.")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(ALL_RUNTIMES),
              help="Run each artifact on this runtime where it can (repeatable: --runtime onnxruntime "
                   "--runtime openvino times every .onnx on both). Default: each artifact's own runtime.")
def command(artifacts, sizes, threads, runs, warmup, baseline, json_path, force, runtimes):
    """Latency, throughput and peak memory of ARTIFACTS (checkpoints, ONNX, NCNN .param, engines) vs PyTorch eager."""
    report = bench(list(artifacts), sizes=parse_sizes(sizes), threads=threads, runs=runs, warmup=warmup,
                   baseline=baseline, json_path=json_path, force=force, runtimes=runtimes or None,
                   progress=lambda msg: click.echo(msg, err=True))
    click.echo(report.markdown())
    if json_path:
        click.echo(f"wrote {json_path}")
