"""The package's import graph, read from the source with ``ast`` (imports inside functions included).

Rules (issue 16, ``../shared/DESIGN.md``): imports go one way, so there is no
cycle among the package's modules; no library module imports the engine
(``ppfr_jax.train``: only its CLI does); ``ppfr_jax.models`` imports only other
models, the weight-import table and .pth reader, the DCT and the error base; TensorFlow is
imported only by the input pipeline (``ppfr_jax.data``).
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ppfr_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: pathlib.Path) -> tuple[set[str], set[str]]:
    """-> (package modules imported anywhere in the file, top-level external packages imported)."""
    internal, external = set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "ppfr_jax":
                while t not in MODULES and "." in t:  # ppfr_jax.models.iresnet.IR18 -> the module
                    t = t.rpartition(".")[0]
                if t != name:
                    internal.add(t)
            else:
                external.add(t.split(".")[0])
    return internal, external


GRAPH = {}
EXTERNAL = {}
for _n, _p in MODULES.items():
    GRAPH[_n], EXTERNAL[_n] = _imports(_n, _p)


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package():
    assert {"ppfr_jax.train", "ppfr_jax.checkpoints", "ppfr_jax.models", "ppfr_jax.cli.train"} <= set(MODULES)
    assert "ppfr_jax.checkpoints" in GRAPH["ppfr_jax.train"]  # an edge the engine has


def test_no_import_cycle():
    # a child module importing its parent package is not an edge here (Python imports the parent first anyway);
    # any other path back to a module is
    graph = {n: {t for t in deps if not n.startswith(t + ".")} for n, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_no_library_module_imports_the_engine():
    importers = sorted(n for n, deps in GRAPH.items() if "ppfr_jax.train" in deps)
    assert importers == ["ppfr_jax.cli.train", "ppfr_jax.pipeline"]
    # the pipeline is for the CLI only
    assert sorted(n for n, deps in GRAPH.items() if "ppfr_jax.pipeline" in deps) == ["ppfr_jax.cli.train"]


def test_models_import_only_models_and_leaves():
    allowed = {"ppfr_jax.checkpoint_import", "ppfr_jax.torch_pickle", "ppfr_jax.errors", "ppfr_jax.frequency"}
    bad = {n: sorted(t for t in deps if not (t == "ppfr_jax.models" or t.startswith("ppfr_jax.models."))
                     and t not in allowed)
           for n, deps in GRAPH.items() if n == "ppfr_jax.models" or n.startswith("ppfr_jax.models.")}
    assert {n: d for n, d in bad.items() if d} == {}


def test_tensorflow_only_in_the_input_pipeline():
    users = sorted(n for n, ext in EXTERNAL.items() if ext & {"tensorflow", "tensorflow_datasets"})
    assert users and all(n == "ppfr_jax.data" or n.startswith("ppfr_jax.data.") for n in users), users


def test_every_console_script_resolves():
    """Each ``[project.scripts]`` entry names a callable that exists (``prog = "module:function"``)."""
    import importlib
    import tomllib
    scripts = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"ppfr-train", "ppfr-eval", "ppfr-import", "ppfr-align", "ppfr-protect", "ppfr-verify", "ppfr-export",
            "ppfr-privacy", "ppfr-records"} <= set(scripts)
    for prog, target in scripts.items():
        module, _, func = target.partition(":")
        assert module.startswith("ppfr_jax.cli.") or module == "ppfr_jax.main", (prog, target)
        assert callable(getattr(importlib.import_module(module), func)), (prog, target)
