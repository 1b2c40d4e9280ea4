#!/usr/bin/env python3
"""Keep the shape of peerd/: no import cycle between its modules, no module over 800 lines.

An import counts wherever it is written: at the top, inside a function (a lazy import still
makes the two modules depend on each other) or under `if TYPE_CHECKING:` (a cycle the type
checker needs is a cycle in the design). One exception: the imports inside a package's
module-level `__getattr__` (PEP 562), the lazy facade `peerd.Client` uses, which runs only when
a user asks for the attribute, never while a peerd module imports another.

`from peerd.a import b` is an edge to the module `peerd.a.b` when that is a module, else to
`peerd.a`; the parent packages a dotted import initialises are not edges (no module can reach
its submodules' names through them without naming them).

Exit status 1 lists every cycle (once, as its strongly connected component and one path
through it) and every module that is too long.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

MAX_LINES = 800
# Modules allowed over MAX_LINES for now, each with the reason and who removes it.
LINE_ALLOWANCES: dict[str, str] = {}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def _lazy_facade_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside a module-level `def __getattr__`."""
    out: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            out.update(id(n) for n in ast.walk(node))
    return out


def imports(name: str, path: Path, source: str, known: Iterable[str]) -> set[str]:
    """The modules of `known` that module `name` (at `path`) imports."""
    known = set(known)
    tree = ast.parse(source, str(path))
    skip = _lazy_facade_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    out.add(target)
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {
        name: imports(name, path, path.read_text(encoding="utf-8"), mods)
        for name, path in mods.items()
    }


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def path_through(edges: Mapping[str, set[str]], component: list[str]) -> list[str]:
    """One cycle inside `component`, as the modules in import order (first repeated last)."""
    members = set(component)
    start = component[0]
    # Breadth-first from start back to start, inside the component.
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, set()) & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component  # unreachable for a real component


def long_modules(root: Path, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    out = []
    for name, path in modules(root).items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append((name, n))
    return out


def problems(root: Path) -> list[str]:
    edges = graph(root)
    out = [
        f"import cycle: {' -> '.join(path_through(edges, c))} (modules in it: {', '.join(c)})"
        for c in cycles(edges)
    ]
    for name, n in long_modules(root):
        if name in LINE_ALLOWANCES:
            continue
        out.append(f"{name}: {n} lines (at most {MAX_LINES}: split it by concern)")
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "peerd").resolve()
    found = problems(root)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
