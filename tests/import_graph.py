"""The package's import graph, read with ``ast``: the parser tests/test_layers.py checks, and a counter.

``python tests/import_graph.py [ROOT]`` prints, for the package under ROOT (default: this checkout),
the cycles (strongly connected groups of modules, and the number of simple cycles when networkx is
installed), the package imports inside functions, the private names imported across modules and
the longest functions (lines, and lines without the docstring).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_names(package: Path) -> dict[str, Path]:
    """``{dotted name relative to the package ("" for its __init__): file}``."""
    out = {}
    for f in package.rglob("*.py"):
        parts = list(f.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(modules: dict[str, Path], name: str):
    """(target, imported name or None, inside a function, line, relative) for every import of module ``name``.

    A relative import's target is a module of the package (``from . import arch`` -> ``arch``), else
    an absolute module name.
    """
    path = modules[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    for node in ast.walk(tree):
        lazy = id(node) in in_function
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, lazy, node.lineno, False
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                for a in node.names:
                    yield node.module, a.name, lazy, node.lineno, False
                continue
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{target}.{a.name}".strip(".")
                if sub in modules:  # from . import arch: the module arch
                    yield sub, None, lazy, node.lineno, True
                else:
                    yield target, a.name, lazy, node.lineno, True


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main(root: Path) -> None:
    package = root / "keystone_kernels"
    modules = module_names(package)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy, private = 0, []
    for name in modules:
        for target, symbol, inside, _, relative in imports(modules, name):
            if not relative or target == name:
                continue
            edges[name].add(target)
            lazy += inside
            if symbol and symbol.startswith("_") and not symbol.startswith("__"):
                private.append(f"{name} <- {target}.{symbol}")
    groups = _strongly_connected(edges)
    print(f"modules {len(modules)}, import edges {sum(map(len, edges.values()))}")
    print(f"strongly connected groups (cycles): {sorted(len(g) for g in groups)}", *(sorted(g) for g in groups))
    try:
        import networkx
    except ImportError:
        pass
    else:
        graph = networkx.DiGraph([(a, b) for a, bs in edges.items() for b in bs])
        print(f"simple cycles: {sum(1 for _ in networkx.simple_cycles(graph))}")
    print(f"package imports inside functions: {lazy}")
    print(f"private names imported across modules: {len(private)}")
    lengths = []
    for name, f in modules.items():
        for fn in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = fn.body[1:] if ast.get_docstring(fn) else fn.body
                code = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                lengths.append((fn.end_lineno - fn.lineno + 1, code, f"{name}.{fn.name}"))
    print("longest functions (lines, lines without docstring):", sorted(lengths, reverse=True)[:5])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
