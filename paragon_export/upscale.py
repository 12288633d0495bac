"""`upscale`: run any artifact (checkpoint, ONNX, TensorRT engine, NCNN) on images or folders, tile by tile.

Runtimes are reached through `runners.open_runner` (Polygraphy runners), wrapped in `ModelRunner`
(numpy NCHW float32 in -> numpy NCHW float32 out), so the tiler below never knows which runtime it
drives. Tiles overlap by `overlap` LR pixels; each tile's output is weighted by a separable profile
that is zero within overlap/4 of an inner tile edge (where the zero padding of the convolutions
reaches) and rises with a raised cosine over the next overlap/2, so neighbouring weights sum to one
and a seam is a smooth crossfade between two outputs that already agree.

Alpha is upscaled separately: bicubic by default (a photo-trained model would add texture and
ringing to a mask, and it costs no second network pass), or through the model as a gray image with
`alpha="model"` (sharper edges for sprites and line art). 16-bit inputs give 16-bit outputs, gray
inputs gray outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .artifact import atomic_output, check_output
from .errors import ParagonError
from .images import IMAGE_SUFFIXES, bicubic_upscale, list_images
from .picture import OUTPUT_SUFFIXES, Picture, check_writable_format, image_size, read_picture, write_picture

if TYPE_CHECKING:  # the annotation lets tests/test_trt_contract.py type the TensorRT calls made through it
    from polygraphy.backend.trt import TrtRunner

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32
ALPHA_MODES = ("bicubic", "model")


# ----------------------------------------------------------------------------------------------
# Model runner: one artifact behind numpy NCHW float32 -> numpy NCHW float32.

@dataclass
class ModelRunner:
    """A Polygraphy runner plus what tiling needs: scale, input dtype and the shapes it accepts."""

    runner: object  # from runners.open_runner, with .info (runners.RunnerInfo)
    kind: str  # the runtime: torch | onnxruntime | openvino | tensorrt | ncnn
    path: Path
    metadata: dict = field(default_factory=dict)
    scale: int | None = None
    min_hw: tuple[int, int] = (1, 1)
    max_hw: tuple[int, int] | None = None
    input_name: str = "input"
    input_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    expected_scale: int | None = None
    min_batch: int = 1  # an engine profile may start above batch 1

    def __enter__(self) -> "ModelRunner":
        self.runner.activate()
        try:
            self._inspect()
        except BaseException:
            self.runner.deactivate()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.runner.deactivate()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n < self.min_batch:  # fill the engine's smallest batch with copies; only ours come back
            x = np.concatenate([x, np.repeat(x[-1:], self.min_batch - n, axis=0)])
        feed = {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)}
        out = next(iter(self.runner.infer(feed).values()))
        return np.asarray(out[:n], dtype=np.float32)

    def last_inference_time(self) -> float:
        """Seconds spent inside the runtime by the last call (Polygraphy's own input checks excluded)."""
        return float(self.runner.last_inference_time())

    def _inspect(self) -> None:
        from polygraphy.datatype import DataType

        # use_numpy_dtypes=False: the default rewrites the runner's own metadata in place, after
        # which Polygraphy rejects float32 inputs as not float32.
        meta = self.runner.get_input_metadata(use_numpy_dtypes=False)
        name, info = next(iter(meta.items()))
        self.input_name = name
        self.input_dtype = np.dtype(DataType.to_dtype(info.dtype, "numpy"))
        dims = list(info.shape)
        if len(dims) != 4 or (isinstance(dims[1], int) and dims[1] > 0 and dims[1] != 3):  # gray, RGBA, ...
            raise ParagonError(f"{self.path}: expected a 1x3xHxW input, found shape {dims}")
        fixed = [d if isinstance(d, int) and d > 0 else None for d in dims[2:]]
        if all(fixed):
            self.min_hw = self.max_hw = (fixed[0], fixed[1])
        if self.kind == "tensorrt":
            self.min_batch, self.min_hw, self.max_hw = _trt_profile(self.runner, name)
        if self.scale is None:
            self.scale = self._probe_scale()
        if self.expected_scale is not None and self.expected_scale != self.scale:
            raise ParagonError(f"{self.path} upscales x{self.scale}, not x{self.expected_scale} as requested")

    def _probe_scale(self) -> int:
        h, w = max(self.min_hw[0], 16), max(self.min_hw[1], 16)
        if self.max_hw:
            h, w = min(h, self.max_hw[0]), min(w, self.max_hw[1])
        y = self(np.zeros((1, 3, h, w), np.float32))
        s = y.shape[2] // h if y.ndim == 4 else 0  # a classifier's [N, classes] has no height
        if y.ndim != 4 or y.shape[1] != 3 or s < 1 or y.shape[2] != s * h or y.shape[3] != s * w:
            raise ParagonError(f"{self.path}: a 1x3x{h}x{w} input gave {list(y.shape)}, not an image upscale")
        return s


def _trt_profile(runner: TrtRunner, name: str) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Min batch and min/max H, W of the engine's first optimisation profile (every call must fit it)."""
    engine = runner.context.engine
    lo, _, hi = engine.get_tensor_profile_shape(name, 0)
    return int(lo[0]), (int(lo[2]), int(lo[3])), (int(hi[2]), int(hi[3]))


def open_model(path: Path | str, *, threads: int | None = None, scale: int | None = None,
               runtime: str | None = None) -> ModelRunner:
    """Build (not yet activate) the runner for an artifact; use it as a context manager.

    `scale` is needed only for checkpoints that do not record it (traiNNer-redux); for the other
    kinds it is checked against what the artifact says. `runtime` picks e.g. openvino for an .onnx."""
    from polygraphy.logger import G_LOGGER

    from .runners import open_runner

    G_LOGGER.colors = False  # otherwise its first message is a stdout nag about the 'colored' package

    # ONNX Runtime's fused integer kernels: the speed a user of the int8 file gets on this CPU.
    runner = open_runner(path, runtime, threads=threads, scale=scale, native_int8=True)
    info = runner.info
    # A checkpoint's scale came from `scale` itself if it needed one; other kinds are checked against it.
    return ModelRunner(runner, info.runtime, info.path, metadata=dict(info.meta), scale=info.scale,
                       expected_scale=None if info.kind == "checkpoint" else scale)


# ----------------------------------------------------------------------------------------------
# Tiling.

def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Fewest tiles of `tile` pixels covering `length`, spread evenly, neighbours overlapping >= `overlap`."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [(i * (length - tile)) // (n - 1) for i in range(n)]


def _ramp(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * v)


def tile_profile(start: int, size: int, length: int, overlap: int, scale: int) -> np.ndarray:
    """Blend weights of one tile along one axis, at output (HR) resolution."""
    u = (np.arange(size * scale, dtype=np.float64) + 0.5) / scale  # LR distance from the tile start
    w = np.ones_like(u)
    if overlap > 0:
        guard, width = overlap / 4, overlap / 2
        if start > 0:
            w *= _ramp((u - guard) / width)
        if start + size < length:
            w *= _ramp((size - u - guard) / width)
    return w


def tile_count(h: int, w: int, tile: int, overlap: int, max_hw: tuple[int, int] | None = None) -> int:
    th, tw = _tile_hw(h, w, tile, max_hw)
    return len(tile_starts(h, th, overlap)) * len(tile_starts(w, tw, overlap))


def _tile_hw(h: int, w: int, tile: int, max_hw: tuple[int, int] | None) -> tuple[int, int]:
    th, tw = (h, w) if tile <= 0 else (min(tile, h), min(tile, w))
    if max_hw:
        th, tw = min(th, max_hw[0]), min(tw, max_hw[1])
    return th, tw


def check_tiling(tile: int, overlap: int) -> None:
    if tile < 0 or overlap < 0:
        raise ParagonError("--tile and --overlap must be >= 0")
    if tile and 2 * overlap >= tile:
        raise ParagonError(f"--overlap {overlap} must be less than half of --tile {tile}")


def upscale_array(model: Callable[[np.ndarray], np.ndarray], img: np.ndarray, *, scale: int, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP, min_hw: tuple[int, int] = (1, 1),
                  max_hw: tuple[int, int] | None = None, on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """Upscale an HxWx3 float32 image tile by tile; `tile=0` runs it whole (still split to `max_hw`)."""
    check_tiling(tile, overlap)
    h, w = img.shape[:2]
    th, tw = _tile_hw(h, w, tile, max_hw)
    if (th < h and 2 * overlap >= th) or (tw < w and 2 * overlap >= tw):
        raise ParagonError(f"overlap {overlap} does not fit tiles of {th}x{tw} (the runtime's limit)")
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy = [tile_profile(y, th, h, overlap, scale) for y in ys]
    wx = [tile_profile(x, tw, w, overlap, scale) for x in xs]
    s = scale
    out = np.zeros((h * s, w * s, 3), np.float32)
    for y, py in zip(ys, wy):
        for x, px in zip(xs, wx):
            patch = img[y:y + th, x:x + tw].transpose(2, 0, 1)[None]
            # Engines and static-shape ONNX may need a larger input: replicate the edge, crop after.
            ph, pw = max(0, min_hw[0] - th), max(0, min_hw[1] - tw)
            if ph or pw:
                patch = np.pad(patch, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
            res = model(np.ascontiguousarray(patch, dtype=np.float32))
            if res.shape[-2:] != (patch.shape[2] * s, patch.shape[3] * s):
                raise ParagonError(f"model output {list(res.shape)} is not x{s} of its input {list(patch.shape)}")
            res = res[0, :, :th * s, :tw * s].transpose(1, 2, 0)
            out[y * s:(y + th) * s, x * s:(x + tw) * s] += res * (py[:, None, None] * px[None, :, None]).astype(np.float32)
            if on_tile:
                on_tile()
    # The weights are a product of row and column profiles on a grid, so their sum factorises too.
    norm_y, norm_x = np.zeros(h * s), np.zeros(w * s)
    for y, py in zip(ys, wy):
        norm_y[y * s:(y + th) * s] += py
    for x, px in zip(xs, wx):
        norm_x[x * s:(x + tw) * s] += px
    out /= (norm_y[:, None, None] * norm_x[None, :, None]).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------
# The command.

@dataclass
class Job:
    src: Path
    dst: Path
    size: tuple[int, int] = (0, 0)


def plan_jobs(inputs: list[Path], out: Path) -> list[Job]:
    """Map inputs to outputs. One image file and an OUT with an image suffix: OUT is that file.
    Otherwise OUT is a folder: files land as OUT/<stem>.png, folders keep their relative paths."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ParagonError("no input given")
    for p in inputs:
        if not p.exists():
            raise ParagonError(f"input {p} does not exist")
    _refuse_unwritable_image_name(out)
    if len(inputs) == 1 and inputs[0].is_file() and out.suffix.lower() in IMAGE_SUFFIXES:
        _check_image_suffix(inputs[0])
        return [Job(inputs[0], out)]
    if out.exists() and not out.is_dir():
        raise ParagonError(f"output {out} exists and is not a folder")
    jobs = []
    for p in inputs:
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise ParagonError(f"no images in {p}")
            jobs += [Job(f, out / f.relative_to(p).with_suffix(".png")) for f in found]
        else:
            _check_image_suffix(p)
            jobs.append(Job(p, out / f"{p.stem}.png"))
    seen: dict[Path, Path] = {}
    for j in jobs:
        if j.dst in seen:
            raise ParagonError(f"{seen[j.dst]} and {j.src} would both be written to {j.dst}")
        seen[j.dst] = j.src
    return jobs


def _refuse_unwritable_image_name(out: Path) -> None:
    """`-o out.gif` means an image the user wants, not a folder named out.gif: say we cannot write it."""
    from PIL import Image

    suffix = out.suffix.lower()
    if out.is_dir() or suffix in OUTPUT_SUFFIXES or suffix not in Image.registered_extensions():
        return
    raise ParagonError(f"{out}: cannot write {suffix!r} images (use {', '.join(sorted(OUTPUT_SUFFIXES))}, "
                       "or a folder name without an image suffix)")


def _refuse_what_cannot_fit(artifact, jobs: list[Job], tile: int) -> None:
    """Before any image is decoded: each one's tiles and HR accumulators must fit in memory."""
    from .memory import check_fits, footprint, upscale_bytes

    fp = footprint(artifact)
    if fp is None:
        return
    for j in jobs:
        h, w = j.size
        check_fits(f"upscale of {j.src.name} ({w}x{h} px, --tile {tile})", upscale_bytes(fp, j.size, tile))


def _check_image_suffix(p: Path) -> None:
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ParagonError(f"{p} is not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")


def upscale(artifact: Path | str, inputs: list[Path | str], out: Path | str, *, tile: int = DEFAULT_TILE,
            overlap: int = DEFAULT_OVERLAP, alpha: str = "bicubic", force: bool = False, threads: int | None = None,
            scale: int | None = None, progress: bool | None = None, runtime: str | None = None) -> list[dict]:
    """Upscale every input image with `artifact`; returns one record per written file.

    All checks (inputs readable, outputs free, formats possible) happen before the model runs, so a
    bad batch fails in seconds; every output is written atomically."""
    from .runners import EngineNotRunnable

    check_tiling(tile, overlap)
    if alpha not in ALPHA_MODES:
        raise ParagonError(f"unknown alpha mode {alpha!r} (use {' or '.join(ALPHA_MODES)})")
    out = Path(out)
    jobs = plan_jobs([Path(p) for p in inputs], out)
    existing = [j.dst for j in jobs if j.dst.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ParagonError(f"{existing[0]} already exists{more} (use --force to overwrite)")
    sources = [artifact, *(j.src for j in jobs)]  # no output may land on an input, --force or not
    for j in jobs:
        check_output(j.dst, force=force, inputs=sources)
    for j in jobs:
        j.size = image_size(j.src)
    _refuse_what_cannot_fit(artifact, jobs, tile)
    for j in jobs:  # decode every input once before any output: a truncated file fails the batch up front
        read_picture(j.src)
    try:
        return _upscale_jobs(artifact, jobs, tile=tile, overlap=overlap, alpha=alpha, force=force, threads=threads,
                             scale=scale, progress=progress, runtime=runtime, sources=sources)
    except EngineNotRunnable as e:  # raised only while loading: nothing was written
        raise ParagonError(f"skipped {artifact}: {e}") from None


def _upscale_jobs(artifact, jobs: list[Job], *, tile, overlap, alpha, force, threads, scale, progress,
                  runtime, sources) -> list[dict]:
    from tqdm import tqdm

    records = []
    with open_model(artifact, threads=threads, scale=scale, runtime=runtime) as model:
        total = sum(tile_count(*j.size, tile, overlap, model.max_hw) for j in jobs)
        with tqdm(total=total, unit="tile", disable=(None if progress is None else not progress),
                  desc="upscale") as bar:
            for j in jobs:
                pic = read_picture(j.src)
                check_writable_format(j.dst, bits=pic.bits, alpha=pic.alpha is not None)
                bar.set_postfix_str(j.src.name, refresh=False)
                kw = dict(scale=model.scale, tile=tile, overlap=overlap, min_hw=model.min_hw, max_hw=model.max_hw)
                rgb = upscale_array(model, pic.rgb, on_tile=bar.update, **kw)
                a = None
                if pic.alpha is not None:
                    if alpha == "model":
                        a = upscale_array(model, np.repeat(pic.alpha[..., None], 3, -1), **kw).mean(-1)
                    else:
                        a = bicubic_upscale(pic.alpha[..., None], model.scale)[..., 0]
                result = Picture(rgb, a, pic.bits, pic.gray)
                with atomic_output(j.dst, force=force, inputs=sources) as tmp:
                    write_picture(result, tmp, suffix=j.dst.suffix)
                records.append(dict(input=str(j.src), output=str(j.dst), size_in=list(pic.rgb.shape[:2]),
                                    size_out=list(rgb.shape[:2]), bits=pic.bits, alpha=pic.alpha is not None,
                                    gray=pic.gray, tiles=tile_count(*j.size, tile, overlap, model.max_hw)))
    return records
