"""Writes a parity run to disk: parity.json (schema-validated), parity.md and crop PNGs, as one folder
that appears atomically (built in a temp folder next to it, then renamed into place)."""

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


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def _db(v: float | None) -> str:
    # null = infinite PSNR: identical to the ground truth (bicubic at x1, where LR is the HR crop)
    return "identical (inf dB)" if v is None else f"{v:.2f} dB"


def markdown(report: dict) -> str:
    r = report["reference"]
    q = report["reference_quality"]
    imgs = ", ".join(i["name"] for i in report["images"])
    sizes = ", ".join(f"{h}x{w}" for h, w in report["sizes"])
    compat_fail = [a for a in report["artifacts"] if a["role"] == "runtime" and a["status"] in ("fail", "error")
                   and not a["gated"]]
    more = f" (runtime compatibility: {len(compat_fail)} row(s) FAIL, see below)" if compat_fail else ""
    lines = [
        f"# Parity: {'PASS' if report['passed'] else 'FAIL'}{more}",
        "",
        f"Reference: `{Path(r['path']).name}` ({r['variant']} x{r['scale']}, {r['upsampler']}, "
        f"{r['runner']}), sha256 `{r['sha256'][:12]}`",
        f"Images: {imgs} ({report['image_source']}) at LR {sizes}: {len(report['cases'])} cases. "
        f"Ground truth (HR): reference Y-PSNR {_db(q['y_psnr'])} / SSIM {q['ssim']:.4f}; "
        f"bicubic {_db(q['bicubic_y_psnr'])} / {q['bicubic_ssim']:.4f}"
        + (" (at x1 bicubic is the identity: LR = HR)." if r["scale"] == 1 else "."),
        "",
        "| result | artifact | runner | precision | max abs (limit) | min PSNR dB (limit) | Y-PSNR dB (Δ ref) | SSIM | NaN/Inf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report["artifacts"]:
        s, lim = a["summary"], a["limits"]
        result = {"reference": "ref", "pass": "PASS", "fail": "**FAIL**", "error": "**ERROR**",
                  "skipped": "skipped", "info": "info"}[a["status"]]
        if s is None:
            cells = ["–"] * 5
        else:
            max_abs = _fmt(s["max_abs"], ".2e")
            psnr_txt = ("identical" if s["identical_cases"] == s["cases"] else _fmt(s["min_psnr"], ".1f"))
            if a["role"] == "reference":
                max_abs, psnr_txt = "–", "–"
            if lim:
                max_abs += f" ({lim['max_abs']:g})"
                psnr_txt += f" ({lim['min_psnr']:g})"
            delta = "" if s["y_psnr_delta"] is None or a["role"] == "reference" else f" ({s['y_psnr_delta']:+.2f})"
            cells = [max_abs, psnr_txt, _fmt(s["y_psnr"], ".2f") + delta, _fmt(s["ssim"], ".4f"), str(s["nonfinite"])]
        lines.append(f"| {result} | {a['name']} | {a['runner']} | {a['precision']} | " + " | ".join(cells) + " |")
    notes = [n for a in report["artifacts"] for n in _notes(a)]
    if notes:
        lines += ["", *notes]
    lines += verified_on(report)
    pngs = report["outputs"]["pngs"]
    if pngs:
        lines += ["", "Crops (LR bicubic | reference | each artifact; row 2: |diff| heat maps, white = at the "
                  "artifact's max-abs limit): " + ", ".join(f"[{Path(p).name}]({p})" for p in pngs)]
    tv = report["tool_versions"]
    lines += ["", "Tools: " + ", ".join(f"{k} {v}" for k, v in tv.items() if v), ""]
    return "\n".join(lines)


def _notes(a: dict) -> list[str]:
    """The lines under the table for one row: why it failed, was skipped or is not gated, and where
    localization puts the error."""
    notes = []
    if a["status"] in ("fail", "error", "skipped") or (a["status"] == "info" and a["reasons"]):
        notes.append(f"- **{a['name']}** ({a['status']}): " + "; ".join(a["reasons"]))
    elif a["status"] == "info":
        notes.append(f"- {a['name']}: not gated, {a['note']}")
    loc = a["localization"]
    if loc and loc["culprit"]:
        c = loc["culprit"]
        weights = f", weights {', '.join(f'`{w}`' for w in c['weights'])}" if c["weights"] else ""
        module = f" (module `{c['module']}`{weights})" if c["module"] else weights
        err = "NaN/Inf" if c["rel_err"] is None else f"{c['rel_err']:.2e}"
        against = (f"passing fp32 ONNX `{Path(loc['reference']).name}`" if loc["method"] == "onnx-reference"
                   else "the fp32 torch reference (forward hooks)")
        where = (f"{loc['layers_compared']} tensors compared with {against} on "
                 f"{loc['case']['image']} {loc['case']['lr_size'][0]}x{loc['case']['lr_size'][1]}")
        if loc["sharp_jump"]:
            notes.append(f"  - first layer whose error jumps: `{c['node']}`{module}: relative error {err}, "
                         f"at most {c['prev_max_rel_err']:.1e} before it; {where}")
        else:
            notes.append(f"  - no single layer's error jumps {loc['ratio']:g}x above {loc['floor']:g} (the error "
                         f"builds up); largest increase at `{c['node']}`{module}: {err}; {where}")
    elif loc:
        notes.append(f"  - localization: {loc['note']}")
    return notes


def verified_on(report: dict) -> list[str]:
    """Per file, the runtimes it passed and failed on: what the model card tells a user who picks a runtime."""
    by_path: dict = {}
    for a in report["artifacts"]:
        if a["role"] in ("artifact", "runtime") and a["path"]:
            by_path.setdefault(a["path"], []).append(a)
    if not any(len(rows) > 1 for rows in by_path.values()):
        return []
    lines = ["", "Runtimes each file is verified on (gated rows decide the result above; the others are "
             "compatibility rows with the same limits):", ""]
    for path, rows in by_path.items():
        parts = []
        for a in rows:
            s = a["summary"]
            fig = f", {s['min_psnr']:.1f} dB" if a["status"] == "fail" and s and s["min_psnr"] is not None else ""
            parts.append(f"{a['runner']} {a['status'].upper()}{fig}" + ("" if a["gated"] else " (not gated)"))
        lines.append(f"- `{Path(path).name}`: " + ", ".join(parts))
    return lines


def runtime_verdicts(report: dict) -> dict:
    """Per file name: the runtimes whose row passed (verified), and every other judged or skipped
    row with its status and reasons (not verified). Info rows (ungated diagnostics) are neither."""
    out: dict = {}
    for a in report["artifacts"]:
        if a["role"] not in ("artifact", "runtime") or not a["path"]:
            continue
        v = out.setdefault(Path(a["path"]).name, {"precision": a["precision"], "verified": [], "not_verified": []})
        if a["status"] == "pass":
            v["verified"].append(a["runner"])
        elif a["status"] in ("fail", "error", "skipped"):
            v["not_verified"].append({"runner": a["runner"], "status": a["status"], "reasons": a["reasons"]})
    return out


def card_lines(verdicts: dict) -> list[str]:
    """The model card's runtime section: exactly the passing rows as verified, the rest as not."""
    lines = ["## Runtimes", "", "A file is verified on the runtimes whose parity row passed, and on no other:", ""]
    for name, v in sorted(verdicts.items()):  # the manifest stores keys sorted: one order either way
        text = f"- `{name}` ({v['precision']}): verified on " + (", ".join(v["verified"]) or "no runtime")
        for n in v["not_verified"]:
            what = "not tested" if n["status"] == "skipped" else "**not verified**"
            text += f"; {what} on {n['runner']} ({n['status'].upper()}: {'; '.join(n['reasons'])})"
        lines.append(text)
    return lines


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


def write_outputs(report: dict, entries: list, cases: list, scale: int, out_dir: Path, *, force: bool,
                  png_crops: int, inputs=()) -> dict:
    """Render and write everything; returns the report as written (non-finite numbers as null)."""
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
        report["outputs"] = {"json": "parity.json", "markdown": "parity.md", "pngs": pngs}
        report = json_finite(report)
        validate(report)
        (tmp / "parity.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        (tmp / "parity.md").write_text(markdown(report))
    return report
