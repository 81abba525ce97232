"""The package's import graph: no circle, and no module importing another module's private names.

Every ``import`` statement counts, at module level or inside a function: a lazy import that climbs back up the
layers is a circle too. ``python tests/test_imports.py`` prints the graph, one module per line with the package
modules it imports, and any circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_vae"
# Old module paths kept for one release: each only re-exports its new home, and nothing imports them.
SHIMS = {"vae", "conditional", "linear_gaussian", "relaxed", "kl", "estimators", "variance", "step", "distributed"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(module: str, current: str, is_package: bool, level: int) -> str:
    if level == 0:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """``(edges, private)``: for each package module the package modules it imports (anywhere in its body), and
    ``(importer, "module.name", line)`` for each import of a private name from another module."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private: list[tuple[str, str, int]] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", name, is_package, node.level)
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)
                    else:
                        targets.append(base)
                        if alias.name.startswith("_") and not alias.name.startswith("__") and base in modules \
                                and base != name:
                            private.append((name, f"{base}.{alias.name}", node.lineno))
            else:
                continue
            for target in targets:
                while target and target not in modules:  # "import pyro_vae.x.y" names pyro_vae.x.y
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("pyro_vae"):
                    edges[name].add(target)
    return edges, private


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    edges, _ = import_graph()
    assert circles(edges) == []


def test_no_module_imports_a_private_name_of_another():
    _, private = import_graph()
    assert private == []


def test_nothing_in_the_package_imports_an_old_module_path():
    edges, _ = import_graph()
    users = {m: sorted(t for t in targets if t.rpartition(".")[2] in SHIMS and t.count(".") == 1)
             for m, targets in edges.items() if m.rpartition(".")[2] not in SHIMS or m.count(".") != 1}
    assert {m: t for m, t in users.items() if t} == {}


def test_the_graph_sees_a_circle_and_a_private_import(tmp_path, monkeypatch):
    # the checks above can fail: a two-module circle made of lazy imports, and a private import
    pkg = tmp_path / "pyro_vae"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pyro_vae.b import _g\n")
    (pkg / "b.py").write_text("def _g():\n    import pyro_vae.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    edges, private = import_graph()
    assert circles(edges) == [["pyro_vae.a", "pyro_vae.b"]]
    assert private == [("pyro_vae.a", "pyro_vae.b._g", 2)]


if __name__ == "__main__":
    graph, private_imports = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    for component in circles(graph):
        print("CIRCLE:", " <-> ".join(component))
    for importer, target, line in private_imports:
        print(f"PRIVATE: {importer}:{line} imports {target}")
