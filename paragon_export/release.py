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

PRECISIONS = ("fp32", "fp16", "int8", "qat")
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
OPSET = 17


def _rel(root: Path, p: Path) -> str:
    return str(Path(p).resolve().relative_to(root.resolve()))


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
    def __init__(self, root: Path, echo: Callable[[str], None]) -> None:
        self.root, self.echo = root, echo
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
            self.echo(f"{tag}: unchanged, skipped")
            return rec
        self.remove(name)  # inputs or options changed: the old outputs go before the new run
        self.echo(f"{tag} ...")
        t0 = time.perf_counter()
        try:
            outs = fn()
        except ParagonError as e:
            raise ParagonError(f"release stopped at step '{name}': {e}") from None
        rec = {
            "key": key, "inputs": {k: {"path": _rel(self.root, p) if p.resolve().is_relative_to(self.root.resolve())
                                       else str(p), "sha256": hashes[k]} for k, p in inputs.items()},
            "params": params, "seconds": round(time.perf_counter() - t0, 2), "tool_versions": tool_versions(),
            "artifacts": [{"path": _rel(self.root, o["path"]), "sha256": sha256_file(o["path"]), "kind": o["kind"],
                           "parent": o.get("parent"), "bytes": Path(o["path"]).stat().st_size,
                           **({"meta": o["meta"]} if o.get("meta") else {})} for o in outs],
        }
        self.manifest.record(name, rec)
        self.echo(f"{tag}: done in {rec['seconds']:.1f} s")
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
            self.echo(f"removing {name}: not requested by this run")
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
            force: bool = False, echo: Callable[[str], None] = print, ncnn: bool | None = None) -> dict:
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
        return _release(src, ckpt is None, loaded, root, calib, precisions, want_engine, scale, echo, no_ncnn)


def _release(src, default_model, loaded, root, calib, precisions, want_engine, scale, echo, no_ncnn) -> dict:
    variant, s = loaded.variant, loaded.scale
    run = _Run(root, echo)
    want_ov = "int8" in precisions and _openvino_ready()
    run.keep_only({"fuse", "onnx", "parity"} | ({"int8", "qat"} & set(precisions))
                  | ({"int8-cpu"} if "int8" in precisions else set()) | (set() if no_ncnn else {"ncnn"})
                  | ({"engine"} if want_engine else set()) | ({"int8-openvino"} if want_ov else set()))
    total = 3 + 2 * ("int8" in precisions) + ("qat" in precisions) + bool(want_engine) + want_ov + (not no_ncnn)
    calib_digest = _folder_digest(calib) if {"int8", "qat"} & set(precisions) else None
    run.manifest.data["source"] = {"path": str(src), "sha256": loaded.sha256, "variant": variant, "scale": s,
                                   "upsampler": loaded.upsampler, "default_model": default_model}
    run.manifest.data["precisions"] = list(precisions)

    fused_path = root / f"{variant}_x{s}_fused.safetensors"

    def do_fuse():
        if loaded.fused:
            with atomic_output(fused_path, force=True, inputs=[src]) as tmp:
                shutil.copyfile(src, tmp)
            return [{"path": fused_path, "kind": "fused", "parent": str(src), "meta": {"note": "source already fused"}}]
        from .fuse import fuse

        art, report = fuse(src, fused_path, scale=scale, force=True)
        return [{"path": art.path, "kind": "fused", "parent": str(src),
                 "meta": {"exactness_max_abs": report["exactness_max_abs"], "gap": report["gap"],
                          "params_before": report["params_before"], "params_after": report["params_after"]}}]

    rec = run.step("fuse", total, {"checkpoint": src}, {"scale": s}, do_fuse)
    fused = run.path(rec, "fused")

    def do_onnx():
        from .export_onnx import export_onnx

        arts = export_onnx(fused, root, opset=OPSET, fp16="fp16" in precisions, force=True)
        outs = [{"path": arts["fp32"].path, "kind": "onnx-fp32", "parent": _rel(root, fused),
                 "meta": {"verification": arts["fp32"].meta.get("verification", {}).get("summary")}}]
        if "fp16" in arts:
            outs.append({"path": arts["fp16"].path, "kind": "onnx-fp16", "parent": _rel(root, arts["fp32"].path)})
        return outs

    rec = run.step("onnx", total, {"fused": fused}, {"opset": OPSET, "fp16": "fp16" in precisions}, do_onnx)
    fp32 = run.path(rec, "onnx-fp32")
    artifacts = [fused] + [root / a["path"] for a in rec["artifacts"]]
    cpu_files: list[Path] = []  # the ORT-CPU int8 file where it pays: parity only, no TensorRT engine
    ncnn_pairs = _ncnn_step(run, total, root, fused, fp32, precisions, no_ncnn, echo)

    if "int8" in precisions:
        def do_int8():
            from .int8 import quantize_int8

            # The original recipe's comparison row is a diagnostic of `paragon-export int8`; a release
            # ships only the TensorRT recipe, and the comparison costs a second calibration.
            art = quantize_int8(fp32, root, calib_dir=calib, peer=False, force=True,
                                progress=lambda m: echo(f"    {m}"))
            q = art.meta["quality"]
            report_path = Path(art.meta["output"]["report"])
            return [{"path": art.path, "kind": "onnx-int8", "parent": _rel(root, fp32),
                     "meta": {"fp32": q["fp32"].get("mean"), "int8": q["int8"].get("mean"),
                              "kept_float": art.meta["mixed_precision"].get("kept_float"),
                              "mac_share": art.meta["mixed_precision"].get("mac_share")}},
                    {"path": report_path, "kind": "int8-report", "parent": _rel(root, art.path)}]

        rec = run.step("int8", total, {"fp32": fp32}, {"calib": calib_digest}, do_int8)
        artifacts.append(run.path(rec, "onnx-int8"))
        cpu_files = _int8_cpu_step(run, total, root, fp32, calib, calib_digest, echo)

    if want_ov:
        trt_int8 = artifacts[-1]

        def do_int8_openvino():
            from .int8_openvino import write_openvino_int8

            art = write_openvino_int8(trt_int8, root, force=True)
            return [{"path": art.path, "kind": "onnx-int8-openvino", "parent": _rel(root, trt_int8),
                     "meta": {"openvino_vs_reference": art.meta["openvino_vs_reference"]}}]

        try:
            rec = run.step("int8-openvino", total, {"int8": trt_int8}, {}, do_int8_openvino)
            artifacts.append(run.path(rec, "onnx-int8-openvino"))
        except ParagonError as e:  # an extra for one runtime: its failure costs that file, not the release
            echo(f"int8-openvino: not written ({e}); the card lists where the TensorRT int8 file is verified")

    if "qat" in precisions:
        def do_qat():
            from .qat import qat

            art, report = qat(fused, root / "qat", data_dir=calib, force=True, progress=False,
                              say=lambda m: echo(f"    {m}"))
            return [{"path": art.path, "kind": "onnx-qat", "parent": _rel(root, fused)}]

        rec = run.step("qat", total, {"fused": fused}, {"calib": calib_digest}, do_qat)
        artifacts.append(run.path(rec, "onnx-qat"))

    def do_parity():
        from .parity import parity
        from .parity_report import runtime_verdicts

        # The CPU int8 file's row is reported, never gating: whether it exists depends on this CPU.
        report = parity(artifacts + cpu_files + ncnn_pairs, root / "parity", ref=src, scale=s, force=True,
                        ungated=tuple(cpu_files))
        return [{"path": root / "parity" / "parity.json", "kind": "parity-json", "parent": None,
                 "meta": {"passed": report["passed"], "runtimes": runtime_verdicts(report)}},
                {"path": root / "parity" / "parity.md", "kind": "parity-md", "parent": None},
                # every file of the folder, so a later run can prove it ours and remove it whole
                *({"path": root / "parity" / png, "kind": "parity-png", "parent": None}
                  for png in report["outputs"]["pngs"])]

    inputs = {"reference": src, **{p.name: p for p in artifacts + cpu_files + ncnn_pairs},
              **{p.with_suffix(".bin").name: p.with_suffix(".bin") for p in ncnn_pairs}}
    rec = run.step("parity", total, inputs, {}, do_parity)
    parity_ok = rec["artifacts"][0]["meta"]["passed"]

    if want_engine:
        # the OpenVINO int8 file is for OpenVINO; the TensorRT engines come from the TensorRT-targeted files
        trt_files = [p for p in artifacts[1:] if not p.stem.endswith("_openvino")]

        def do_engine():
            from paragon_export.engines.build import build_engine

            outs = []
            for p in trt_files:
                art, _ = build_engine(p, root / "engines", check=True, force=True, echo=lambda m: echo(f"    {m}"))
                outs.append({"path": art.path, "kind": "engine", "parent": _rel(root, p)})
            return outs

        run.step("engine", total, {p.name: p for p in trt_files}, {}, do_engine)
    else:
        echo("engine: skipped (needs TensorRT and an NVIDIA GPU; pip install 'paragon-export[trt]')")

    run.manifest.save()
    _write_card(root, run.manifest)
    if not parity_ok:
        raise ParagonError(f"parity failed: see {root / 'parity' / 'parity.md'}")
    return run.manifest.data


def _int8_cpu_step(run: _Run, total: int, root: Path, fp32: Path, calib, calib_digest, echo) -> list[Path]:
    """The ORT-CPU int8 file, beside the TensorRT one and only where it pays on this CPU: the step
    always records the figures and the decision; returns the file, if written, for parity."""
    from .cpu import isa

    def do_int8_cpu():
        from .int8_cpu import cpu_int8, describe, summary

        res = cpu_int8(fp32, root, calib_dir=calib, force=True, progress=lambda m: echo(f"    {m}"))
        echo(f"    {describe(res.record)}")
        meta, parent = summary(res.record), _rel(root, fp32)
        outs = [{"path": Path(res.record["output"]["report"]), "kind": "int8-cpu-report", "parent": parent,
                 "meta": meta}]
        if res.artifact is not None:
            outs.insert(0, {"path": res.artifact.path, "kind": "onnx-int8-cpu", "parent": parent, "meta": meta})
        return outs

    # The decision is measured on this machine: another ISA makes a new one.
    rec = run.step("int8-cpu", total, {"fp32": fp32}, {"calib": calib_digest, "isa": isa()}, do_int8_cpu)
    return [run.root / a["path"] for a in rec["artifacts"] if a["kind"] == "onnx-int8-cpu"]


def _ncnn_step(run: _Run, total: int, root: Path, fused: Path, fp32: Path, precisions, reason: str | None,
               echo) -> list[Path]:
    """NCNN pairs (fp32, and fp16 storage with fp16) from the release's own fp32 ONNX, verified against
    the fused checkpoint; skipped with a note when pnnx/ncnn are missing. Returns the .param paths."""
    if reason:
        echo(f"ncnn: skipped ({reason})")
        return []
    wanted = ("fp32", "fp16") if "fp16" in precisions else ("fp32",)

    def do_ncnn():
        from .ncnn_export import export_ncnn

        arts = export_ncnn(fused, root / "ncnn", onnx=fp32, precisions=wanted, force=True)
        outs = []
        for p, art in arts.items():
            v = art.meta["verification"]
            outs += [{"path": art.path, "kind": f"ncnn-{p}", "parent": _rel(root, fp32),
                      "meta": {"max_abs": v["max_abs"], "min_psnr": v["min_psnr"], "pnnx": art.meta["converter"]["pnnx"]}},
                     {"path": art.path.with_suffix(".bin"), "kind": f"ncnn-{p}-bin", "parent": _rel(root, art.path)},
                     {"path": art.path.with_suffix(".json"), "kind": f"ncnn-{p}-json", "parent": _rel(root, art.path)}]
        return outs

    rec = run.step("ncnn", total, {"fused": fused, "fp32": fp32}, {"precisions": list(wanted)}, do_ncnn)
    return [root / a["path"] for a in rec["artifacts"] if a["kind"] in ("ncnn-fp32", "ncnn-fp16")]


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
