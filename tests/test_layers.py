"""The layers docs/api.md promises ("Layers"), enforced: every `sage_llm` import in every source file, at module
level or inside a function, goes to its own package or to a lower layer, and no two modules import each other
(directly or round a loop). Reads the source with `ast`: nothing is imported, so a lazy import counts as much as a
top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "sage_llm"

# lowest first; a unit is a subpackage (`engine`) or a top-level module (`api`); one layer may hold several units,
# which then do not import each other
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__",),  # the package itself: __version__
    ("core",),
    ("observe",),
    ("models",),
    ("engine",),
    ("api",),
    ("chat", "bench", "doctor"),  # users of the API: the chat client, the benchmark, the checks
    ("gateway",),
    ("cli",),
    ("__main__",),
)
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

# (importing module, imported module): upward imports whose removal is owned by a change under way elsewhere (none
# now: doctor.py's SAGE check reads core/sage_cli.py since issue 24 item 3)
PENDING: set[tuple[str, str]] = set()


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PKG.rglob("*.py"))}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The sage_llm modules an import statement loads (the most specific one that exists)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            pkg = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
            pkg_parts = pkg.split(".")
            base = ".".join(pkg_parts[: len(pkg_parts) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name.startswith("sage_llm") and name in MODULES:
            out.append(name)
    return out


def _imports() -> dict[str, list[tuple[str, int]]]:
    graph: dict[str, list[tuple[str, int]]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, [])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.extend((t, node.lineno) for t in _targets(module, node) if t != module)
    return graph


GRAPH = _imports()


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for module, edges in graph.items():
        for target, line in edges:
            a, b = _unit(module), _unit(target)
            if a != b and LEVEL[b] >= LEVEL[a] and (module, target) not in PENDING:
                bad.append(f"{MODULES[module].relative_to(SRC)}:{line}: {module} (layer {a}) imports {target} "
                           f"(layer {b}, {'same' if LEVEL[a] == LEVEL[b] else 'higher'})")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w, _line in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
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
                        found.append(sorted(comp))
    return found


def test_every_unit_has_a_layer() -> None:
    assert sorted({_unit(m) for m in MODULES} - set(LEVEL)) == []


def test_no_import_goes_up_a_layer() -> None:
    bad = upward_imports(GRAPH)
    assert bad == [], "imports against docs/api.md's layers:\n" + "\n".join(bad)


def test_every_pending_exception_is_still_needed() -> None:
    """An exception outlives its reason only by mistake: once the import is gone, its entry must go too."""
    present = {(m, t) for m, edges in GRAPH.items() for t, _ in edges}
    assert sorted(PENDING - present) == [], "remove these from PENDING: the imports are gone"


def test_no_modules_import_each_other() -> None:
    assert cycles(GRAPH) == []


@pytest.mark.parametrize(("module", "source", "target"), [
    ("sage_llm.core.state", "def f():\n    from sage_llm.engine import process\n", "sage_llm.engine.process"),
    ("sage_llm.observe.logs", "from sage_llm.engine.targets import select\n", "sage_llm.engine.targets"),
    ("sage_llm.engine.status", "def f():\n    from sage_llm.gateway import daemon\n", "sage_llm.gateway.daemon"),
    ("sage_llm.chat.session", "def f():\n    import sage_llm.bench.loadgen\n", "sage_llm.bench.loadgen"),
    ("sage_llm.api", "from . import doctor\n", "sage_llm.doctor"),
    ("sage_llm.doctor", "from sage_llm.cli import _output\n", "sage_llm.cli._output"),
])
def test_the_check_sees_an_upward_import(module: str, source: str, target: str) -> None:
    """The check itself can fail: an upward (or sideways) import, lazy or not, absolute or relative, is reported."""
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import | ast.ImportFrom))
    graph = {module: [(t, 1) for t in _targets(module, node)]}
    assert [t for t, _ in graph[module]] == [target]
    assert len(upward_imports(graph)) == 1


def test_the_check_sees_a_cycle() -> None:
    graph = {"sage_llm.engine.manager": [("sage_llm.engine.cluster", 1)],
             "sage_llm.engine.cluster": [("sage_llm.engine.manager", 2)]}
    assert cycles(graph) == [["sage_llm.engine.cluster", "sage_llm.engine.manager"]]
