"""Contract tests: our TensorRT calls against the REAL TensorRT Python bindings of each version, on a CPU.

The `tensorrt-cuXX-bindings` wheels hold the real `tensorrt.so`; it imports once stub libraries with the
SONAMEs it links (`libnvinfer.so.N`, `libnvonnxparser.so.N`, `libnvinfer_plugin.so.N`) export the symbols
it needs. Those stubs are compiled here with the system C compiler; nothing can be built or run with them,
but `dir()` and the pybind11 signatures give each version's true API. One subprocess per wheel (two majors
cannot share a process) walks the AST of our TensorRT code, infers which TensorRT class each variable holds
(from constructors, the return types in the signatures, and call sites), and checks every attribute chain,
method, keyword and argument count. It also checks the fake tensorrt of tests/test_engines.py, the builder
flags, our IProgressMonitor subclass and Logger, and that Polygraphy's TensorRT backend imports.

The wheels come from `TRT_BINDINGS_DIR` (`.ci/run` downloads them); no test uses the network. Without them
the tests skip with the reason, unless `REQUIRE_TRT_CONTRACT=1` (set by `.ci/run`), where they fail.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "engines").glob("*.py")), ROOT / "paragon_export" / "runners.py",
           ROOT / "paragon_export" / "upscale.py", ROOT / "tests" / "gpu" / "smoke.py"]
MODULE_NAMES = {"trt", "tensorrt"}  # how our code names the tensorrt module (a parameter or an import)
# Types of objects from other libraries that hand out TensorRT objects (Polygraphy's runner).
FOREIGN = {"TrtRunner": {"context": "IExecutionContext", "engine": "ICudaEngine"}}
STUB_SYMBOLS = ["createInferBuilder_INTERNAL", "createInferRuntime_INTERNAL", "createInferRefitter_INTERNAL",
                "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getInferLibVersion",
                "getNvOnnxParserVersion", "getPluginRegistry", "getBuilderPluginRegistry", "initLibNvInferPlugins"]
STUB_LIBS = ("nvinfer", "nvonnxparser", "nvinfer_plugin")


# ====================================================================== the probe (runs in the subprocess)

def _split_top(text: str) -> list[str]:
    """Split a pybind11 parameter list at top-level commas (types nest [], defaults hold <...> and quotes)."""
    parts, depth, cur, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return parts + ([cur.strip()] if cur.strip() else [])


def signatures(obj, name: str) -> list[tuple[list[tuple[str, bool]], bool, bool, str]] | None:
    """Overloads of a pybind11 callable from its docstring: ([(param, has_default)], *args, **kwargs, returns).
    `self`/`arg0` of methods are dropped. None when the docstring carries no signature."""
    found = []
    for m in re.finditer(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) -> (.+)$", obj.__doc__ or "", re.M):
        params, star, dstar = [], False, False
        for i, p in enumerate(_split_top(m.group(1))):
            pname = p.split(":")[0].split("=")[0].strip()
            if i == 0 and pname in ("self", "arg0"):
                continue
            if pname.startswith("**"):
                dstar = True
            elif pname.startswith("*"):
                star = True
            else:
                params.append((pname, "=" in p))
        found.append((params, star, dstar, m.group(2).strip()))
    return found or None  # an overloaded function's "f(*args, **kwargs)" head line has no "->": skipped


def accepts(sig, npos: int, kws: set[str]) -> bool:
    params, star, dstar, _ = sig
    if npos > len(params) and not star:
        return False
    names = [p for p, _ in params]
    if any(k in names[:npos] or (k not in names and not dstar) for k in kws):
        return False
    return all(i < npos or p in kws or has_default for i, (p, has_default) in enumerate(params))


class Probe(ast.NodeVisitor):
    """Walks one file in source order, typing variables with the TensorRT class they hold."""

    def __init__(self, trt, path: str, param_types: dict, report: dict):
        self.trt, self.path, self.param_types, self.report = trt, path, param_types, report
        self.env: dict[str, tuple] = {}
        self.funcs: dict[str, ast.FunctionDef] = {}

    def problem(self, node, msg: str) -> None:
        self.report["problems"].add(f"{self.path}:{node.lineno}: {msg}")

    def cls_type(self, name: str):
        name = name.split("::")[-1].split(".")[-1].strip("'\" ")
        obj = getattr(self.trt, name, None)
        return ("instance", obj) if isinstance(obj, type) else None

    # ------------------------------------------------------------------ expressions
    def resolve(self, node):
        if isinstance(node, ast.Name):
            return ("module",) if node.id in MODULE_NAMES else self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return ("module",) if node.attr == "trt" else self.attribute(node, base)  # Target.trt: the module
        if isinstance(node, ast.Call):
            return self.call(node)
        for child in ast.iter_child_nodes(node):
            self.visit(child) if isinstance(child, ast.stmt) else self.resolve(child)
        return None

    def attribute(self, node: ast.Attribute, base):
        if base is None:
            return None
        if base[0] == "foreign":
            t = FOREIGN[base[1]].get(node.attr)
            return self.cls_type(t) if t else None
        owner = self.trt if base[0] == "module" else base[1]
        what = "tensorrt" if base[0] == "module" else owner.__name__
        if not hasattr(owner, node.attr):
            self.problem(node, f"{what}.{node.attr} does not exist in TensorRT {self.trt.__version__}")
            return None
        self.report["checked"].add(f"{what}.{node.attr}")
        value = getattr(owner, node.attr)
        if base[0] == "instance":
            prop = next((c.__dict__[node.attr] for c in owner.__mro__ if node.attr in c.__dict__), None)
            if isinstance(prop, property):
                m = re.search(r"-> (\S+)\s*$", ((prop.fget and prop.fget.__doc__) or "").strip() + "\n")
                return self.cls_type(m.group(1)) if m else None
            return ("method", owner, node.attr)
        if isinstance(value, type):
            return ("class", value)
        if callable(value):  # a module function, or an unbound method called with an explicit self
            return ("function", owner, node.attr) if base[0] == "module" else ("unbound", owner, node.attr)
        return ("value", value)

    def call(self, node: ast.Call):
        f = self.resolve(node.func)
        for a in node.args:
            self.resolve(a.value if isinstance(a, ast.Starred) else a)
        for k in node.keywords:
            self.resolve(k.value)
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            base, name = self.resolve(node.args[0]), node.args[1]
            if base and isinstance(name, ast.Constant) and base[0] in ("module", "class", "instance"):
                owner = self.trt if base[0] == "module" else base[1]
                key = f"{'tensorrt' if base[0] == 'module' else owner.__name__}.{name.value}"
                self.report["optional"][key] = hasattr(owner, name.value)
            return None
        if isinstance(node.func, ast.Name) and node.func.id in self.funcs:
            self.note_call_site(node)
        if isinstance(node.func, ast.Name) and ("return", node.func.id) in self.param_types:
            return self.param_types[("return", node.func.id)]  # one of our functions returning a TensorRT object
        if f is None or f[0] not in ("class", "method", "function", "unbound"):
            return None
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return None
        owner, name = (f[1], "__init__") if f[0] == "class" else (f[1], f[2])
        label = f"{owner.__name__ if isinstance(owner, type) else 'tensorrt'}.{name}"
        sigs = signatures(getattr(owner, name), name)
        kws, npos = {k.arg for k in node.keywords}, len(node.args) - (f[0] == "unbound")
        if sigs is None:
            self.report["unsigned"].add(label)
        elif not any(accepts(s, npos, kws) for s in sigs):
            shown = " | ".join("(" + ", ".join(p for p, _ in s[0]) + ")" for s in sigs)
            self.problem(node, f"{label} takes {shown} in TensorRT {self.trt.__version__}; we pass "
                               f"{npos} positional and keywords {sorted(kws) or 'none'}")
        else:
            self.report["checked"].add(f"{label}()")
        if f[0] == "class":
            return ("instance", owner)
        return self.cls_type(sigs[0][3]) if sigs else None

    def note_call_site(self, node: ast.Call) -> None:
        fn = self.funcs[node.func.id]
        names = [a.arg for a in fn.args.args]
        bound = list(zip(names, node.args)) + [(k.arg, k.value) for k in node.keywords if k.arg in names]
        for pname, expr in bound:
            t = self.resolve(expr)
            if t and t[0] == "instance":
                self.param_types[(self.path, fn.name, pname)] = t

    # ------------------------------------------------------------------ statements
    def visit_Module(self, node):
        self.funcs = {n.name: n for n in ast.walk(node) if isinstance(n, ast.FunctionDef)}
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        saved = dict(self.env)
        for a in node.args.args + node.args.kwonlyargs:
            ann = a.annotation.value if isinstance(a.annotation, ast.Constant) else getattr(a.annotation, "id", None)
            if isinstance(ann, str) and ann in FOREIGN:
                self.env[a.arg] = ("foreign", ann)
            elif (self.path, node.name, a.arg) in self.param_types:
                self.env[a.arg] = self.param_types[(self.path, node.name, a.arg)]
            else:
                self.env.pop(a.arg, None)
        outer, self.current = getattr(self, "current", None), node.name
        for stmt in node.body:
            self.visit(stmt)
        self.env, self.current = saved, outer

    def visit_Return(self, node):
        t = self.resolve(node.value) if node.value else None
        if t and t[0] == "instance" and getattr(self, "current", None):
            self.param_types[("return", self.current)] = t  # by name: callers import it from other files

    def visit_ClassDef(self, node):
        for base in node.bases:
            t = self.resolve(base)
            if t and t[0] == "class":
                self.check_overrides(node, t[1])
        for stmt in node.body:
            self.visit(stmt)

    def check_overrides(self, node: ast.ClassDef, base: type) -> None:
        """Methods of our subclass of a TensorRT class override real methods with the real arity."""
        for fn in (n for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")):
            if not hasattr(base, fn.name):
                self.problem(fn, f"{base.__name__}.{fn.name} (overridden by {node.name}) does not exist")
                continue
            sigs = signatures(getattr(base, fn.name), fn.name) or []
            if sigs and not any(len(s[0]) == len(fn.args.args) - 1 for s in sigs):
                self.problem(fn, f"{node.name}.{fn.name} takes {len(fn.args.args) - 1} arguments; TensorRT calls "
                                 f"{base.__name__}.{fn.name} with {len(sigs[0][0])}")
            self.report["checked"].add(f"{base.__name__}.{fn.name} (override)")

    def visit_Assign(self, node):
        t = self.resolve(node.value)
        for target in node.targets:
            self.bind(target, t)

    def visit_AnnAssign(self, node):
        self.bind(node.target, self.resolve(node.value) if node.value else None)

    def visit_With(self, node):
        for item in node.items:
            t = self.resolve(item.context_expr)
            if item.optional_vars is not None:
                self.bind(item.optional_vars, t)
        for stmt in node.body:
            self.visit(stmt)

    def bind(self, target, t) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = t
        elif isinstance(target, ast.Attribute):
            self.assign_attribute(target)
        else:
            self.resolve(target)

    def assign_attribute(self, target: ast.Attribute) -> None:
        base = self.resolve(target.value)
        if base and base[0] == "instance":
            prop = next((c.__dict__[target.attr] for c in base[1].__mro__ if target.attr in c.__dict__), None)
            if not isinstance(prop, property) or prop.fset is None:
                self.problem(target, f"{base[1].__name__}.{target.attr} is not a settable property in TensorRT "
                                     f"{self.trt.__version__}")
            else:
                self.report["checked"].add(f"{base[1].__name__}.{target.attr} =")

    def visit_ImportFrom(self, node):
        if node.module == "polygraphy.backend.trt":
            self.report["polygraphy_names"].update(a.name for a in node.names)

    def generic_visit(self, node):
        for child in ast.iter_child_nodes(node):
            self.visit(child) if isinstance(child, (ast.stmt, ast.mod)) else self.resolve(child)


def probe_main() -> None:
    """Subprocess entry: `tensorrt` imports from the wheel with stub libraries; JSON report on stdout."""
    import tensorrt as trt

    request = json.loads(sys.stdin.read())
    report = {k: set() for k in ("problems", "checked", "unsigned", "polygraphy_names")}
    report["optional"] = {}
    param_types: dict = {}
    for _ in range(3):  # call sites type the parameters of the functions they call; three rounds settle it
        report["problems"].clear()
        for path in request["files"]:
            Probe(trt, os.path.relpath(path, ROOT), param_types, report).visit(ast.parse(Path(path).read_text()))
    out = {k: sorted(v) if isinstance(v, set) else v for k, v in report.items()}
    out["version"] = trt.__version__
    out["builder_flags"] = sorted(trt.BuilderFlag.__members__)
    out["network_flags"] = {k: int(v) for k, v in trt.NetworkDefinitionCreationFlag.__members__.items()}
    out["fake_problems"] = check_fake(trt, request["fake"])
    out["runtime"] = check_runtime(trt)
    print(json.dumps(out))


def check_fake(trt, fake: dict) -> list[str]:
    """Every name the fake tensorrt of test_engines has must exist in the real one, with compatible arguments."""
    bad = []
    for cls_name, members in fake.items():
        real = getattr(trt, cls_name, None)
        if real is None:
            bad.append(f"tensorrt.{cls_name} does not exist")
            continue
        for name, params in members.items():
            if not hasattr(real, name):
                bad.append(f"tensorrt.{cls_name}.{name} does not exist")
            elif params is not None:
                sigs = signatures(getattr(real, "__init__" if name == "__init__" else name), name)
                if sigs and not any(accepts(s, 0, set(params)) for s in sigs):
                    bad.append(f"fake {cls_name}.{name}({', '.join(params)}) does not match the real signature")
    return bad


def check_runtime(trt) -> dict:
    """Our classes against the real base classes, and Polygraphy's TensorRT backend on this module."""
    result = {}
    try:
        from paragon_export.engines.builder import _progress_monitor

        echoed = []
        mon = _progress_monitor(trt, echoed.append)
        assert isinstance(mon, trt.IProgressMonitor)
        mon.phase_start("Building engine", None, 2)
        assert mon.step_complete("Building engine", 0) is True
        mon.phase_finish("Building engine")
        assert echoed[0] == "Building engine (2 steps)", echoed
        trt.Logger(trt.Logger.WARNING)
        result["progress_monitor"] = "ok"
    except Exception as e:  # reported, not raised: the parent test shows it
        result["progress_monitor"] = f"{type(e).__name__}: {e}"
    try:
        import polygraphy.backend.trt as pbt
        from polygraphy.backend.trt import util

        util.get_trt_logger()  # subclasses trt.ILogger: the lazy `import tensorrt` really happens
        pbt.TrtRunner(pbt.EngineFromBytes(b"plan"), name="probe")
        result["polygraphy"] = "ok"
    except Exception as e:
        result["polygraphy"] = f"{type(e).__name__}: {e}"
    return result


# ====================================================================== the tests (pytest process)

if __name__ != "__main__":
    import inspect

    import pytest

    WHEEL = re.compile(r"tensorrt_cu\d+_bindings-(\d+)\.[^-]+-cp(\d+)-")

    def _unavailable(reason: str):
        """Skip with the reason, or fail where the contract is required (CI)."""
        if os.environ.get("REQUIRE_TRT_CONTRACT") == "1":
            pytest.fail(f"TensorRT contract required (REQUIRE_TRT_CONTRACT=1) but {reason}", pytrace=False)
        print(f"TensorRT contract tests skipped: {reason}")
        pytest.skip(reason)

    def _wheels() -> list[Path]:
        folder = os.environ.get("TRT_BINDINGS_DIR")
        if not folder:
            return []
        py = f"{sys.version_info.major}{sys.version_info.minor}"
        return sorted(w for w in Path(folder).glob("tensorrt_cu*_bindings-*.whl")
                      if (m := WHEEL.match(w.name)) and m.group(2) == py)

    WHEELS = _wheels()
    _SEEN: dict[str, dict] = {}  # version -> probe report, for the test across versions

    def test_bindings_of_trt_10_and_11_are_present():
        """The contract needs one TensorRT 10 and one 11 (two majors: their APIs differ)."""
        majors = {WHEEL.match(w.name).group(1) for w in WHEELS}
        if not {"10", "11"} <= majors:
            _unavailable(f"no tensorrt-cu12/cu13-bindings wheels of TensorRT 10 and 11 for this Python in "
                         f"TRT_BINDINGS_DIR={os.environ.get('TRT_BINDINGS_DIR')!r} (.ci/run downloads them)")

    def _stub_libs(folder: Path, major: str) -> Path:
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            _unavailable("no C compiler to build the stub TensorRT libraries")
        src = folder / "stub.c"
        src.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in STUB_SYMBOLS))
        for lib in STUB_LIBS:
            so = f"lib{lib}.so.{major}"
            subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / so), f"-Wl,-soname,{so}", str(src)],
                           check=True, capture_output=True)
        return folder

    def _fake_surface(version: str) -> dict:
        """Every class, enum and member of test_engines' fake tensorrt (with method parameter names)."""
        from test_engines import _fake_trt

        out = {}
        for name, val in vars(_fake_trt(version)).items():
            if name.startswith("_") or name == "calls":
                continue
            members = vars(val).items()
            out[name] = {m: (list(inspect.signature(v).parameters)[1:] if inspect.isfunction(v) else None)
                         for m, v in members if not m.startswith("__") or m == "__init__"}
        return out

    @pytest.fixture(scope="module", params=[w.name for w in WHEELS] or ["(none)"])
    def probe(request, tmp_path_factory) -> dict:
        """The probe's report for one bindings wheel (one subprocess, its own stub libraries)."""
        if not WHEELS:
            test_bindings_of_trt_10_and_11_are_present()
        wheel = Path(os.environ["TRT_BINDINGS_DIR"]) / request.param
        major = WHEEL.match(wheel.name).group(1)
        work = tmp_path_factory.mktemp(f"trt{major}")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(work / "whl")
        (work / "whl" / "tensorrt_bindings").rename(work / "tensorrt")  # what `import tensorrt` finds
        libs = _stub_libs(work, major)
        version = re.search(r"__version__ = \"([^\"]+)\"", (work / "tensorrt" / "__init__.py").read_text()).group(1)
        env = {**os.environ, "LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               "PYTHONPATH": os.pathsep.join([str(work), str(ROOT)])}
        request_json = json.dumps({"files": [str(f) for f in SOURCES], "fake": _fake_surface(version)})
        r = subprocess.run([sys.executable, __file__, "--probe"], input=request_json, capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, f"the probe failed on {wheel.name}:\n{r.stderr[-3000:]}"
        _SEEN[version] = json.loads(r.stdout)
        return _SEEN[version]

    def test_our_tensorrt_calls_exist_with_our_arguments(probe):
        assert probe["problems"] == [], f"TensorRT {probe['version']}:\n" + "\n".join(probe["problems"])
        # The walk must really have typed the objects (else it would check nothing and pass): the core calls.
        for call in ("Builder.create_network()", "Builder.build_serialized_network()", "OnnxParser.parse_from_file()",
                     "IBuilderConfig.set_timing_cache()", "IBuilderConfig.progress_monitor =",
                     "IOptimizationProfile.set_shape()", "Runtime.deserialize_cuda_engine()",
                     "ICudaEngine.get_tensor_profile_shape()", "IProgressMonitor.step_complete (override)",
                     "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "BuilderFlag.TF32", "BuilderFlag.REFIT",
                     "BuilderFlag.STRIP_PLAN", "BuilderFlag.VERSION_COMPATIBLE", "Runtime.engine_host_code_allowed =",
                     "OnnxParserRefitter.refit_from_file()", "Refitter.refit_cuda_engine()",
                     "ICudaEngine.serialize()"):
            assert call in probe["checked"], f"{call} was not reached by the walk of our code"
        assert probe["unsigned"] == [], f"calls whose real signature could not be read: {probe['unsigned']}"

    def test_fake_tensorrt_of_test_engines_has_only_real_names(probe):
        assert probe["fake_problems"] == [], "\n".join(probe["fake_problems"])
        fake = _fake_surface(probe["version"])
        major = int(probe["version"].split(".")[0])
        # FP16/INT8 exist exactly where the real version has them (deprecated in 10, removed in 11).
        for flag in ("FP16", "INT8"):
            assert (flag in fake["BuilderFlag"]) == (flag in probe["builder_flags"]) == (major == 10), flag
        from test_engines import _fake_trt

        bit = _fake_trt(probe["version"]).NetworkDefinitionCreationFlag.STRONGLY_TYPED
        assert bit == probe["network_flags"]["STRONGLY_TYPED"], "the fake's STRONGLY_TYPED bit is not the real one"

    def test_progress_monitor_and_polygraphy_work_with_the_real_module(probe):
        assert probe["runtime"] == {"progress_monitor": "ok", "polygraphy": "ok"}
        assert {"EngineFromBytes", "TrtRunner"} <= set(probe["polygraphy_names"])

    def test_optional_probes_name_real_attributes():
        """A getattr/hasattr probe of a TensorRT name may miss in some versions, never in all (a typo)."""
        if len(_SEEN) < 2:
            pytest.skip("needs the probes of two or more TensorRT versions (run the whole file)")
        names = {k for report in _SEEN.values() for k in report["optional"]}
        nowhere = sorted(k for k in names if not any(r["optional"].get(k) for r in _SEEN.values()))
        assert nowhere == [], f"probed names no TensorRT version ({', '.join(_SEEN)}) has: {nowhere}"


if __name__ == "__main__" and sys.argv[1:] == ["--probe"]:
    sys.path.insert(0, str(ROOT))
    probe_main()
    sys.exit(0)
