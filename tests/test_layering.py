"""The package's import structure (issue 37): no import circle among its modules, counting the
imports inside functions (only ``if TYPE_CHECKING:`` blocks are left out); no module imports a
layer above its own; no drafter method file imports another (shared parts live in lower
modules: base, registry, options, and the structures every method may use)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import specdecode

ROOT = Path(specdecode.__file__).parent
# lowest first; a module may import its own layer and the layers below (a module's layer: its
# longest listed prefix below the package; "" the package itself)
LAYERS = [
    ("types", "sampling", "verify", "questions", "chat", "demo", "host"),
    ("models", "datastore", "structured"),
    ("drafters", "policies"),
    ("engine", "scheduler", "api", "plugins"),
    ("bench", "server", "train", "integrations", "cli", "", "datastore.build", "datastore.cli",
     "structured.cli"),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def imports(path: Path, known: dict) -> set[str]:
    """The package modules ``path`` imports, anywhere but under ``if TYPE_CHECKING:``."""

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str] = set()
    stack = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                (node.module or "").startswith("specdecode"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else resolve(node.module))
        elif isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.startswith("specdecode"))
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m}


@functools.cache
def _graph() -> dict[str, frozenset[str]]:
    known = modules()
    return {name: frozenset(imports(path, known) - {name}) for name, path in known.items()}


def graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a fresh copy: tests may change it)."""
    return {name: set(deps) for name, deps in _graph().items()}


def layer(module: str) -> int:
    name = module.partition(".")[2]
    best = max((prefix for names in LAYERS for prefix in names
                if name == prefix or name.startswith(prefix + ".") or prefix == ""), key=len)
    return next(i for i, names in enumerate(LAYERS) if best in names)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(graph()) == []


def test_no_circle_detector_is_blind():
    """The detector finds a circle when there is one (negative control)."""
    edges = graph()
    edges["specdecode.types"] = edges["specdecode.types"] | {"specdecode.api"}
    assert any("specdecode.types" in c for c in cycles(edges))


def test_no_upward_import():
    upward = [f"{a} -> {b}" for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert upward == []


def _registers(path: Path) -> bool:
    """Whether the module registers a drafter (a top-level function decorated ``@register(...)``)."""
    return any(isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register"
               for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)
               for d in node.decorator_list)


def test_no_drafter_method_imports_another():
    edges = graph()
    methods = {m for m, path in modules().items() if m.startswith("specdecode.drafters.")
               and _registers(path)}
    assert len(methods) > 10
    crossing = [f"{a} -> {b}" for a in methods for b in edges[a] if b in methods]
    assert crossing == []
