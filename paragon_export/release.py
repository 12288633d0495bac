"""release: the main job. checkpoint -> fuse -> ONNX fp32 -> fp16 -> int8 (-> qat) -> parity (-> engine),
all in one folder with a manifest and a model card.

Each step is keyed by the sha256 of its input files plus its options (`manifest.step_key`); a rerun
skips every step whose key matches and whose outputs are intact. A failing step stops the run: the
steps before it stay recorded and their files stay valid, the failing step leaves no record.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from . import ownership
from .artifact import atomic_output, check_output_dir, sha256_file
from .checkpoint import load_model
from .defaults import default_checkpoint
from .errors import ParagonError
from .images import list_images, sample_photo_paths
from .manifest import Manifest, step_key, tool_versions
from . import release_steps as steps
from .release_steps import rel

PRECISIONS = ("fp32", "fp16", "int8", "qat")
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
OPSET = 17


def _folder_digest(folder: Path | None) -> str:
    """Content hash of a calibration folder (or of the bundled photos)."""
    paths = list_images(folder) if folder else sample_photo_paths("all")
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def ncnn_unavailable() -> str | None:
    """None when the ncnn step can run (pnnx converts, the ncnn wheel verifies), else why not."""
    missing = [m for m in ("pnnx", "ncnn") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'paragon-export[ncnn]')"
    return None


def _tensorrt_ready() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from paragon_export.engines.gpu import query_gpu

    try:
        query_gpu()
    except ParagonError:
        return False
    return True


def _openvino_ready() -> bool:
    """The OpenVINO int8 file is checked on OpenVINO when it is written: only where OpenVINO is installed."""
    return importlib.util.find_spec("openvino") is not None


class _Run:
    def __init__(self, root: Path, progress: Callable[[str], None]) -> None:
        self.root, self.progress = root, progress
        self.manifest = Manifest(root)
        self.index = 0

    def step(self, name: str, total: int, inputs: dict[str, Path], params: dict, fn: Callable[[], list[dict]]) -> dict:
        """Run `fn` unless the manifest has this step with the same key and intact outputs.

        `fn` returns [{"path", "kind", "parent", "meta"?}]; the record lists them with sha256s."""
        self.index += 1
        tag = f"[{self.index}/{total}] {name}"
        hashes = {k: sha256_file(p) for k, p in inputs.items()}
        key = step_key(name, hashes, params)
        rec = self.manifest.fresh(name, key)
        if rec:
            self.progress(f"{tag}: unchanged, skipped")
            return rec
        self.remove(name)  # inputs or options changed: the old outputs go before the new run
        self.progress(f"{tag} ...")
        t0 = time.perf_counter()
        try:
            outs = fn()
        except ParagonError as e:
            raise ParagonError(f"release stopped at step '{name}': {e}") from None
        rec = {
            "key": key, "inputs": {k: {"path": rel(self.root, p) if p.resolve().is_relative_to(self.root.resolve())
                                       else str(p), "sha256": hashes[k]} for k, p in inputs.items()},
            "params": params, "seconds": round(time.perf_counter() - t0, 2), "tool_versions": tool_versions(),
            "artifacts": [{"path": rel(self.root, o["path"]), "sha256": sha256_file(o["path"]), "kind": o["kind"],
                           "parent": o.get("parent"), "bytes": Path(o["path"]).stat().st_size,
                           **({"meta": o["meta"]} if o.get("meta") else {})} for o in outs],
        }
        self.manifest.record(name, rec)
        self.progress(f"{tag}: done in {rec['seconds']:.1f} s")
        return rec

    def remove(self, name: str) -> None:
        """Drop a step's record and delete its files: the manifest names them as this release's own
        paths (a tampered one is rebuilt, as before the manifest listed it)."""
        rec = self.manifest.data["steps"].get(name)
        if rec is None:
            return
        for art in rec.get("artifacts", []):
            p = self.root / art["path"]
            if p.is_file() and p.resolve().is_relative_to(self.root.resolve()):
                p.unlink()
                ownership.forget(p)
                _remove_empty_dirs(p.parent, self.root)
        self.manifest.drop(name)

    def keep_only(self, names: set[str]) -> None:
        """Remove the steps of an earlier run that this run does not request."""
        for name in [n for n in self.manifest.data["steps"] if n not in names]:
            self.progress(f"removing {name}: not requested by this run")
            self.remove(name)

    def path(self, rec: dict, kind: str) -> Path:
        return self.root / next(a["path"] for a in rec["artifacts"] if a["kind"] == kind)


def _remove_empty_dirs(folder: Path, root: Path) -> None:
    while folder.resolve() != root.resolve() and folder.is_dir() and not any(
            n for n in os.listdir(folder) if n != ownership.LEDGER):
        shutil.rmtree(folder)
        folder = folder.parent


def _check_folder(root: Path, force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ParagonError(f"{root} exists and is not a folder")
    if root.is_dir():
        ownership.clean_stale_temps(root)
        theirs = [n for n in os.listdir(root) if not ownership.hidden_own(n)]
        if theirs and not (root / "manifest.json").is_file() and not force:
            raise ParagonError(f"{root} is not empty and holds no release manifest (use --force to release into it)")


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[None]:
    """One release per folder at a time: a second run refuses, naming the holder's PID. flock is
    released by the kernel when the holder dies, so a killed run never leaves the folder locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    path = root / ownership.LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ParagonError(f"another release is running in {root} (PID {holder}); wait for it to finish") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def release(ckpt: Path | str | None, out_dir: Path | str, *, calib: Path | str | None = None,
            precisions: tuple[str, ...] = DEFAULT_PRECISIONS, engine: bool | None = None, scale: int | None = None,
            force: bool = False, progress: Callable[[str], None] = print, ncnn: bool | None = None) -> dict:
    """Run the release pipeline into `out_dir`; returns the manifest data. `engine=None` builds an
    engine only where TensorRT and a GPU exist, True requires them, False skips; `ncnn` likewise for
    the NCNN pairs (pnnx and ncnn installed)."""
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown or "fp32" not in precisions:
        raise ParagonError(f"--precisions takes fp32 plus any of fp16,int8,qat (got {','.join(precisions)})")
    src = Path(ckpt) if ckpt else default_checkpoint()
    calib = Path(calib) if calib else None
    root = Path(out_dir)
    _check_folder(root, force)
    if engine and not _tensorrt_ready():  # a precondition: check it before hours of other steps
        from .runners import tensorrt_unavailable

        raise ParagonError(f"--engine needs TensorRT and an NVIDIA GPU: {tensorrt_unavailable() or 'no usable GPU'}")
    loaded = load_model(src, scale=scale)  # fail fast on a bad checkpoint, before any step
    if calib is not None:
        list_images(calib)  # a missing folder fails now, not after fuse/onnx/parity
    if ncnn and ncnn_unavailable():
        raise ParagonError(f"--ncnn needs pnnx and ncnn: {ncnn_unavailable()}")
    no_ncnn = "not requested (--no-ncnn)" if ncnn is False else ncnn_unavailable()
    want_engine = _tensorrt_ready() if engine is None else engine
    check_output_dir(root)
    with _folder_lock(root):
        return _release(src, ckpt is None, loaded, root, calib, precisions, want_engine, scale, progress, no_ncnn)


def _release(src, default_model, loaded, root, calib, precisions, want_engine, scale, progress, no_ncnn) -> dict:
    variant, s = loaded.variant, loaded.scale
    run = _Run(root, progress)
    int8 = "int8" in precisions
    want_ov = int8 and _openvino_ready()
    run.keep_only({"fuse", "onnx", "parity"} | ({"int8", "qat"} & set(precisions))
                  | ({"int8-cpu"} if int8 else set()) | (set() if no_ncnn else {"ncnn"})
                  | ({"engine"} if want_engine else set()) | ({"int8-openvino"} if want_ov else set()))
    total = 3 + 2 * int8 + ("qat" in precisions) + bool(want_engine) + want_ov + (not no_ncnn)
    calib_digest = _folder_digest(calib) if {"int8", "qat"} & set(precisions) else None
    run.manifest.data["source"] = {"path": str(src), "sha256": loaded.sha256, "variant": variant, "scale": s,
                                   "upsampler": loaded.upsampler, "default_model": default_model}
    run.manifest.data["precisions"] = list(precisions)
    sub = lambda m: progress(f"    {m}")  # noqa: E731  (a step's own progress, indented under its line)

    fused_path = root / f"{variant}_x{s}_fused.safetensors"
    rec = run.step("fuse", total, {"checkpoint": src}, {"scale": s},
                   lambda: steps.fuse_step(src, loaded, fused_path, scale))
    fused = run.path(rec, "fused")
    rec = run.step("onnx", total, {"fused": fused}, {"opset": OPSET, "fp16": "fp16" in precisions},
                   lambda: steps.onnx_step(root, fused, "fp16" in precisions, OPSET))
    fp32 = run.path(rec, "onnx-fp32")
    artifacts = [fused] + [root / a["path"] for a in rec["artifacts"]]
    cpu_files: list[Path] = []  # the ORT-CPU int8 file where it pays: parity only, no TensorRT engine
    ncnn_pairs = steps.ncnn_step(run, total, root, fused, fp32, precisions, no_ncnn, progress)
    if int8:
        rec = run.step("int8", total, {"fp32": fp32}, {"calib": calib_digest},
                       lambda: steps.int8_step(root, fp32, calib, sub))
        artifacts.append(run.path(rec, "onnx-int8"))
        cpu_files = steps.int8_cpu_step(run, total, root, fp32, calib, calib_digest, progress)
    if want_ov:
        artifacts += steps.int8_openvino_step(run, total, root, artifacts[-1], progress)
    if "qat" in precisions:
        rec = run.step("qat", total, {"fused": fused}, {"calib": calib_digest},
                       lambda: steps.qat_step(root, fused, calib, sub))
        artifacts.append(run.path(rec, "onnx-qat"))

    inputs = {"reference": src, **{p.name: p for p in artifacts + cpu_files + ncnn_pairs},
              **{p.with_suffix(".bin").name: p.with_suffix(".bin") for p in ncnn_pairs}}
    rec = run.step("parity", total, inputs, {}, lambda: steps.parity_step(root, artifacts, cpu_files, ncnn_pairs, src, s))
    parity_ok = rec["artifacts"][0]["meta"]["passed"]
    if want_engine:
        # the OpenVINO int8 file is for OpenVINO; the TensorRT engines come from the TensorRT-targeted files
        trt_files = [p for p in artifacts[1:] if not p.stem.endswith("_openvino")]
        run.step("engine", total, {p.name: p for p in trt_files}, {}, lambda: steps.engine_step(root, trt_files, sub))
    else:
        progress("engine: skipped (needs TensorRT and an NVIDIA GPU; pip install 'paragon-export[trt]')")

    run.manifest.save()
    _write_card(root, run.manifest)
    if not parity_ok:
        raise ParagonError(f"parity failed: see {root / 'parity' / 'parity.md'}")
    return run.manifest.data


def _write_card(root: Path, manifest: Manifest) -> None:
    d = manifest.data
    src = d["source"]
    lines = [f"# {src['variant']} x{src['scale']} release", "",
             f"Source: `{src['path']}` (sha256 `{src['sha256'][:16]}`), upsampler {src['upsampler']}.", "",
             "| artifact | kind | size | sha256 | parent |", "|---|---|---|---|---|"]
    for name, rec in d["steps"].items():
        for a in rec["artifacts"]:
            if a["kind"].startswith(("fused", "onnx", "engine")) or a["kind"] in ("ncnn-fp32", "ncnn-fp16"):
                lines.append(f"| `{a['path']}` | {a['kind']} | {a['bytes'] / 1024:.0f} KiB | `{a['sha256'][:12]}` | "
                             f"{a.get('parent') or ''} |")
    cpu = [a["meta"] for a in d["steps"].get("int8-cpu", {}).get("artifacts", []) if a.get("meta")]
    if cpu:
        lines += ["", cpu[0]["line"]]
    fuse = d["steps"].get("fuse", {}).get("artifacts", [{}])[0].get("meta", {})
    if "gap" in fuse:
        g = fuse["gap"]
        lines += ["", f"Fusion: exact to {fuse['exactness_max_abs']:.1e} max abs; params {fuse['params_before']:,} -> "
                      f"{fuse['params_after']:,}; held-out Y-PSNR dynamic {g['y_psnr_dynamic']:.2f} dB, "
                      f"fused {g['y_psnr_fused']:.2f} dB."]
    verdicts = next((a["meta"]["runtimes"] for a in d["steps"].get("parity", {}).get("artifacts", [])
                     if a["kind"] == "parity-json" and "runtimes" in a.get("meta", {})), None)
    if verdicts:
        from .parity_report import card_lines

        lines += ["", *card_lines(verdicts)]
    par = [a for a in d["steps"].get("parity", {}).get("artifacts", []) if a["kind"] == "parity-md"]
    if par:  # the report this manifest records (its sha256 says it is that file), not whatever lies there
        text = (root / par[0]["path"]).read_text()
        lines += ["", "## Parity", "", text.strip()]
    with atomic_output(root / "MODEL_CARD.md", force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
