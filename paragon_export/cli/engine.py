from pathlib import Path

import click

from paragon_export.engines.build import build_engine, rebuild_engine, verify_engine
from paragon_export.engines.identity import HARDWARE_COMPAT, BuildOptions
from paragon_export.engines.profile import PRESETS

from ..errors import ParagonError
from .options import force_option, output_option


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("engine")
@click.argument("model", type=click.Path(path_type=Path))
@output_option("Engine folder (engines + manifest.json). Required when MODEL is an ONNX file.", required=False)
@click.option("--profile", help="Optimization profile on the LR input, min:opt:max, each NxCxHxW or HxW "
                                "(e.g. 64x64:512x512:1080x1920).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help="Named profile: 720p / 1080p frames (LR input), 4k-tiles (512 px tiles, batch up to 4). "
                   "Default 720p for dynamic models, the fixed shape for static ones.")
@click.option("--workspace", type=float, help="Builder workspace limit in GB (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file to reuse and update (default: one per GPU/TensorRT in ~/.cache/paragon-export).")
@click.option("--hardware-compat", type=click.Choice(HARDWARE_COMPAT), default="none", show_default=True,
              help="ampere+: one engine for every Ampere or newer GPU (somewhat slower).")
@click.option("--refittable", is_flag=True, help="Build a refittable engine: its weights can be replaced later "
                                                "(fine-tuning) without a rebuild.")
@click.option("--version-compatible", is_flag=True,
              help="Embed the lean runtime: the engine also loads in later TensorRT versions of the same major.")
@click.option("--strip-weights", is_flag=True, help="Write a plan without weights; they are refitted from the "
                                                   "ONNX (which must stay where it is) each time it loads.")
@click.option("--refit", "refit", type=click.Path(path_type=Path),
              help="MODEL is a refittable .engine: give it the weights of this fine-tuned ONNX (same graph), "
                   "without a rebuild.")
@click.option("--print-trtexec", is_flag=True, help="Only print the equivalent trtexec command (no TensorRT or "
                                                   "GPU needed), for --trt-version.")
@click.option("--trt-version", default="11", show_default=True,
              help="With --print-trtexec: the TensorRT version trtexec is from (10.x needs --stronglyTyped).")
@click.option("--check", is_flag=True, help="Compare the engine with the fp32 ONNX on ORT CPU on real photos "
                                            "(Polygraphy); a failed check writes nothing.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="fp32 ONNX for --check when MODEL is fp16/int8 (default: its fp32 sibling).")
@click.option("--rebuild", is_flag=True, help="MODEL is an .engine: rebuild it for this GPU/TensorRT from the ONNX "
                                              "its manifest entry names.")
@force_option("Rebuild even if an up-to-date engine exists.")
def command(model, output, profile, preset, workspace, timing_cache, hardware_compat, refittable, version_compatible,
            strip_weights, refit, print_trtexec, trt_version, check, reference, rebuild, force):
    """Build a TensorRT engine of MODEL.onnx for this GPU into a folder, or verify / rebuild MODEL.engine."""
    options = BuildOptions(workspace_gb=workspace, hardware_compat=hardware_compat, refittable=refittable,
                           version_compatible=version_compatible, strip_weights=strip_weights)
    if model.suffix.lower() in (".engine", ".plan", ".trt"):
        if profile or preset or options != BuildOptions() or print_trtexec:
            raise ParagonError("--profile/--preset/--workspace/--hardware-compat/--refittable/--version-compatible/"
                               "--strip-weights/--print-trtexec apply when building from ONNX; an engine is rebuilt "
                               "with the settings it was built with")
        if output is not None:
            raise ParagonError("-o applies when building from ONNX; a rebuilt engine goes next to the old one")
        if refit is not None:
            from paragon_export.engines.refit import refit_engine
            art = refit_engine(model, refit, progress=_err)
            click.echo(f"refitted: {art.path}")
            return
        if rebuild:
            _, report = rebuild_engine(model, timing_cache=timing_cache, check=check, reference=reference,
                                       progress=_err)
            click.echo(report.text())
            return
        entry, report = verify_engine(model, check=check, reference=reference)
        click.echo(f"{model.name} fits this GPU and TensorRT ({entry['key']['gpu']}, TensorRT "
                   f"{entry['key']['trt_version']}) and loads")
        if report is not None:
            click.echo(report.text())
            if not report.passed:
                raise ParagonError(f"{model.name} fails its check")
        return
    if rebuild or refit is not None:
        raise ParagonError("--rebuild/--refit take an .engine file; to rebuild from ONNX use --force")
    if print_trtexec:
        from paragon_export.engines.trtexec import trtexec_for_onnx
        click.echo(trtexec_for_onnx(model, output, profile=profile, preset=preset, options=options,
                                    trt_version=trt_version, timing_cache=timing_cache))
        return
    if output is None:
        raise ParagonError("-o/--output DIR is required when building from ONNX")
    _, report = build_engine(model, output, profile=profile, preset=preset, options=options,
                             timing_cache=timing_cache, force=force, check=check, reference=reference, progress=_err)
    click.echo(report.text())
