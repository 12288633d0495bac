"""The package's shape: one installed import namespace, no import cycles (lazy imports included),
and arch/ importing nothing of ours."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> import package (pyproject.toml's package-dir)
PACKAGES = {"paragon_export": "paragon_export", "arch": "paragon_export.arch",
            "calibration": "paragon_export.calibration", "engines": "paragon_export.engines",
            "trainer": "paragon_export.trainer"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, f: Path, mods: dict) -> set[str]:
    """Our modules `name` imports anywhere in its body (lazy imports count: a cycle is a cycle)."""
    out = set()
    for n in ast.walk(ast.parse(f.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = name.split(".")[: len(name.split(".")) - (0 if f.name == "__init__.py" else 1)]
                base = base[: len(base) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            candidates = [f"{target}.{a.name}" for a in n.names] + [target]
        elif isinstance(n, ast.Import):
            candidates = [a.name for a in n.names]
        else:
            continue
        for c in candidates:
            while c and c not in mods:
                c = c.rpartition(".")[0]
            if c and c != name:
                out.add(c)
                break
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_and_arch_imports_nothing_of_ours():
    mods = _modules()
    edges = {m: _imports(m, f, mods) for m, f in mods.items()}
    assert _cycles(edges) == []
    arch = {m: e for m, e in edges.items() if m.startswith("paragon_export.arch")}
    assert all(t.startswith("paragon_export.arch") for e in arch.values() for t in e), arch


# The direction imports flow in: each module imports only from its own layer or those before it.
# "runtimes" (opening and running any artifact) sits beside engines/calibration/trainer because the engine
# check opens its reference through `open_runner`, and `open_runner` opens engines through engines/.
CORE = {"errors", "artifact", "checkpoint", "images", "picture", "metrics", "verify", "onnx_graph", "cpu", "torch_half",
        "ownership", "manifest", "defaults", "seeded", "records"}
RUNTIMES = {"runners", "openvino_runner", "ncnn_runner", "memory"}
LAYERS = ["arch", "core", "calibration, engines, trainer, runtimes", "pipeline steps", "cli"]


def _layer(module: str) -> int:
    sub = module.split(".")[1] if "." in module else "__init__"
    if sub == "arch":
        return 0
    if sub in CORE or sub == "__init__":
        return 1
    if sub in ("calibration", "engines", "trainer") or sub in RUNTIMES:
        return 2
    return 4 if sub == "cli" else 3


def _upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[_layer(m)]}) imports {t} ({LAYERS[_layer(t)]})"
                  for m, targets in edges.items() for t in targets if _layer(t) > _layer(m))


def test_imports_flow_one_way_arch_core_components_pipeline_cli():
    mods = _modules()
    assert _upward({m: _imports(m, f, mods) for m, f in mods.items()}) == []
    # the check sees a step imported by a core module
    assert _upward({"paragon_export.checkpoint": {"paragon_export.parity"}}) == [
        "paragon_export.checkpoint (core) imports paragon_export.parity (pipeline steps)"]


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_one_installed_namespace():
    top = importlib.metadata.distribution("paragon-export").read_text("top_level.txt")
    assert top is not None and top.split() == ["paragon_export"]


# The brief's size guideline, held: a file a newcomer can read, a function that fits on a screen.
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _oversized(files) -> list[str]:
    out = []
    for f in files:
        text = f.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            out.append(f"{f.name}: {text.count(chr(10))} lines")
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES:
                out.append(f"{f.name}: {n.name}() {n.end_lineno - n.lineno + 1} lines")
    return out


def test_no_file_over_400_lines_or_function_over_60(tmp_path):
    assert _oversized(_modules().values()) == []
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert _oversized([long]) == ["long.py: f() 61 lines"]
