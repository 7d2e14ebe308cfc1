"""Guards the import contract of docs/architecture.md: layers point one way and no modules import each other.

Every `.py` file of the package (found through pyproject.toml's package-dir mapping, so the test follows the
mapping) is parsed with `ast`; every import of a `pdserve` module counts, at module level and inside functions
(a lazy import is still a dependency, and a cycle that only bites on the first call is still a cycle), relative
imports resolved, plus `importlib.import_module("pdserve...")` with a literal name. Nothing is imported, so the
test runs in well under a second and needs no GPU, no Ray, no gRPC.
"""
from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------
# The layer table (docs/architecture.md quotes it). Layer "x" is the module pdserve.x and everything under it; it
# may import from itself and from the layers listed beside it, nothing else of ours. TOP may import anything of
# ours and nothing imports TOP ("__init__" is the package pdserve itself). A module in no row fails the test:
# place a new module in a layer here.
LAYERS: dict[str, tuple[str, ...]] = {
    "errors":         (),
    "config":         ("errors",),
    "proto":          (),
    "tracing":        ("config", "errors"),
    "kernels":        ("config", "errors"),
    "kv_transfer":    ("kernels", "config", "errors"),
    "engine":         ("kernels", "config", "errors"),
    "worker":         ("engine", "kv_transfer", "kernels", "tracing", "config", "errors"),
    "prefill_worker": ("worker", "engine", "kv_transfer", "kernels", "tracing", "config", "errors"),
    "decode_worker":  ("worker", "engine", "kv_transfer", "kernels", "tracing", "config", "errors"),
    "router":         ("proto", "worker", "prefill_worker", "decode_worker", "engine", "kv_transfer", "kernels",
                       "tracing", "config", "errors"),
}
TOP = ("__init__", "cli", "commands", "client", "__main__", "tools", "testing", "planner")
# ---------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
PKG = "pdserve"


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module
    file: str  # importing file, relative to the repository
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.src} imports {self.dst}"


def package_files() -> dict[str, Path]:
    """{module name: file} for every .py file under the folders pyproject.toml maps into the package."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {pkg: (ROOT / folder).resolve() for pkg, folder in conf["package-dir"].items()}
    modules: dict[str, Path] = {}
    for pkg, folder in roots.items():
        others = {d for p, d in roots.items() if p != pkg}
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder)
            # a folder mapped on its own is walked from its own entry; caches and hidden folders are not source
            if any(parent in others for parent in f.parents) or any(
                    p.startswith(".") or p == "__pycache__" for p in rel.parts[:-1]):
                continue
            parts = [*pkg.split("."), *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = f
    return modules


MODULES = package_files()


def _bound_names(path: Path) -> set[str]:
    """Names a package's __init__ binds at module level (what `from package import name` may mean besides a
    submodule); "*" when it defines a module __getattr__ or star-imports, so any name may be bound."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add("*" if node.name == "__getattr__" else node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    return names


def imports_of(module: str, path: Path) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    rel = str(path.relative_to(ROOT))
    edges = []

    def add(name: str, line: int) -> None:
        if name == PKG or name.startswith(PKG + "."):
            edges.append(Edge(module, name, rel, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    raise AssertionError(f"{rel}:{node.lineno}: relative import goes above the package")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                # `from pdserve.engine import attention` imports the module pdserve.engine.attention; a name the
                # package's __init__ does not bind can only be a submodule (one that no longer exists: stale)
                sub = f"{mod}.{alias.name}"
                if sub in MODULES:
                    add(sub, node.lineno)
                elif (mod not in MODULES or alias.name == "*" or MODULES[mod].name != "__init__.py"
                      or {alias.name, "*"} & _bound_names(MODULES[mod])):
                    add(mod, node.lineno)
                else:
                    add(sub, node.lineno)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            add(node.args[0].value, node.lineno)
    return edges


EDGES = list(dict.fromkeys(e for m, f in sorted(MODULES.items()) for e in imports_of(m, f)))  # one per line


def unit_of(module: str) -> str | None:
    """The row of the table a module falls under: a layer name, a TOP name, or None."""
    if module == PKG:
        return "__init__"
    head = module.split(".")[1]
    return head if head in LAYERS or head in TOP else None


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, out = [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _cycle_report(edges: list[Edge], key) -> list[str]:
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        a, b = key(e.src), key(e.dst)
        if a != b:
            graph[a].add(b)
            graph.setdefault(b, set())
    msgs = []
    for comp in sccs(graph):
        inside = set(comp)
        lines = [f"  {e}" for e in edges if key(e.src) in inside and key(e.dst) in inside and key(e.src) != key(e.dst)]
        msgs.append(f"cycle {' <-> '.join(comp)}:\n" + "\n".join(lines))
    return msgs


def test_the_package_was_found():
    # a mapping the test misread would make every other check pass vacuously
    assert {"pdserve.config", "pdserve.engine.engine", "pdserve.router", "pdserve.cli"} <= set(MODULES)
    assert len(EDGES) > 20


def test_the_table_itself_points_one_way():
    for layer, allowed in LAYERS.items():
        assert set(allowed) <= set(LAYERS), f"{layer} lists an unknown layer"
    cycles = sccs({layer: set(allowed) for layer, allowed in LAYERS.items()})
    assert not cycles, f"the layer table has a cycle: {cycles}"


def test_every_module_is_in_a_layer():
    missing = [f"{MODULES[m].relative_to(ROOT)}: {m}" for m in sorted(MODULES) if unit_of(m) is None]
    assert not missing, "modules in no layer (add them to LAYERS or TOP in tests/unit/test_layers.py):\n" + "\n".join(
        missing)


def test_imports_name_modules_that_exist():
    stale = [str(e) for e in EDGES if e.dst not in MODULES]
    assert not stale, "imports of pdserve modules that do not exist:\n" + "\n".join(stale)


def test_layers_point_one_way():
    bad = []
    for e in EDGES:
        src, dst = unit_of(e.src), unit_of(e.dst)
        if src is None or dst is None or src in TOP or src == dst:
            continue  # unplaced modules fail test_every_module_is_in_a_layer
        if dst in ("tools", "testing"):
            bad.append(f"{e}  (only the CLI and tools may use pdserve.{dst})")
        elif dst not in LAYERS[src]:
            allowed = ", ".join(LAYERS[src]) or "nothing of ours"
            bad.append(f"{e}  ({src} may import {allowed})")
    assert not bad, f"{len(bad)} imports against the layers:\n" + "\n".join(bad)


def test_no_module_cycles():
    cycles = _cycle_report(EDGES, key=lambda m: m)
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_no_subpackage_cycles():
    placed = [e for e in EDGES if unit_of(e.src) and unit_of(e.dst)]
    cycles = _cycle_report(placed, key=unit_of)
    assert not cycles, "import cycles between subpackages:\n" + "\n".join(cycles)

