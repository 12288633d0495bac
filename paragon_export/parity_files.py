"""parity_files: writes a parity run's folder: parity.json (schema-validated), parity.md and crop PNGs,
appearing atomically (built in a temp folder next to it, then renamed into place)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .artifact import atomic_folder
from .errors import ParagonError
from .images import bicubic_upscale, to_image
from .metrics import json_finite
from .parity_report import Outputs, ParityReport

# PNG layout: a grid of HR-sized panels, PAD pixels apart, each under a LABEL_H-pixel caption.
# Row 1: LR bicubic | reference | each artifact. Row 2: under each artifact, |artifact - reference|
# (max over RGB) as a heat map where white means "at the artifact's max-abs limit".
PAD = 4
LABEL_H = 14
BACKGROUND = (24, 24, 24)


def load_schema() -> dict:
    return json.loads(resources.files("paragon_export").joinpath("schemas/parity.schema.json").read_text())


def validate(report: dict) -> None:
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(load_schema()).iter_errors(report), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise ParagonError(f"parity report does not match its schema at {where}: {e.message}")


def grid_size(n_artifacts: int, hr_h: int, hr_w: int) -> tuple[int, int]:
    """(width, height) of a crop PNG with n_artifacts columns after bicubic and reference."""
    cols = 2 + n_artifacts
    return cols * hr_w + (cols + 1) * PAD, 2 * (LABEL_H + hr_h) + 3 * PAD


def _heat(diff: np.ndarray, limit: float) -> np.ndarray:
    """Black -> red -> yellow -> white as diff goes 0 -> limit."""
    v = np.clip(np.nan_to_num(diff, nan=limit, posinf=limit) / limit, 0.0, 1.0)[..., None]
    return np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], -1), 0.0, 1.0)


def _u8(img: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(np.nan_to_num(img), 0.0, 1.0) * 255 + 0.5).astype(np.uint8), "RGB")


def _fit(text: str, width: int) -> str:
    room = max(4, width // 6)
    return text if len(text) <= room else text[: room - 1] + "~"


def render_crop(lr: np.ndarray, ref: np.ndarray, arts: list[tuple[str, np.ndarray, float | None]], scale: int) -> Image.Image:
    """arts: (label, HxWx3 output, max-abs limit or None to scale the heat map to its own maximum)."""
    hr_h, hr_w = ref.shape[:2]
    canvas = Image.new("RGB", grid_size(len(arts), hr_h, hr_w), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def put(col: int, row: int, label: str, img: np.ndarray | None) -> None:
        x = PAD + col * (hr_w + PAD)
        y = PAD + row * (LABEL_H + hr_h + PAD)
        draw.text((x + 1, y + 1), _fit(label, hr_w), fill=(230, 230, 230), font=font)
        if img is not None:
            canvas.paste(_u8(img), (x, y + LABEL_H))

    put(0, 0, "LR bicubic", bicubic_upscale(lr, scale))
    put(1, 0, "reference", ref)
    put(0, 1, "|diff| heat:", None)
    put(1, 1, "white = limit", None)
    for k, (label, out, limit) in enumerate(arts):
        out = np.asarray(out, np.float32)
        diff = np.abs(out - ref).max(-1) if out.shape == ref.shape else np.full(ref.shape[:2], np.inf, np.float32)
        finite = diff[np.isfinite(diff)]
        scale_to = limit if limit else (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
        put(2 + k, 0, label, out if out.shape == ref.shape else None)
        put(2 + k, 1, f"|diff|/{scale_to:.2g}", _heat(diff, scale_to))
    return canvas


def _pick_crops(cases: list, n: int) -> list[int]:
    """Up to n cases, alternating sizes and preferring images not shown yet."""
    sizes = list(dict.fromkeys(tuple(c[1]) for c in cases))
    chosen: list[int] = []
    for i in range(min(n, len(cases))):
        size = sizes[i % len(sizes)]
        shown = {cases[k][0] for k in chosen}
        pool = [k for k, c in enumerate(cases) if tuple(c[1]) == size and k not in chosen]
        fresh = [k for k in pool if cases[k][0] not in shown]
        if fresh or pool:
            chosen.append((fresh or pool)[0])
    return chosen


def write_outputs(report: ParityReport, entries: list, cases: list, scale: int, out_dir: Path, *, force: bool,
                  png_crops: int, inputs=()) -> ParityReport:
    """Render and write everything; returns the report as written (non-finite numbers as None)."""
    with atomic_folder(out_dir, force=force, inputs=inputs) as tmp:
        reference = entries[0]
        shown = [e for e in entries[1:] if e.outputs]
        pngs = []
        if png_crops > 0:
            (tmp / "crops").mkdir()
        for k in _pick_crops(cases, png_crops):
            name, size, lr, _ = cases[k]
            ref_img = to_image(reference.outputs[k])
            arts = [(e.name, to_image(e.outputs[k]), e.limits.max_abs if e.limits else None) for e in shown]
            rel = f"crops/{name}_{size[0]}x{size[1]}.png"
            render_crop(lr, ref_img, arts, scale).save(tmp / rel)
            pngs.append(rel)
        report.outputs = Outputs(pngs=pngs)
        data = json_finite(report.to_json())
        validate(data)
        written = ParityReport.from_json(data)
        (tmp / report.outputs.json).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        (tmp / report.outputs.markdown).write_text(written.markdown())
    return written
