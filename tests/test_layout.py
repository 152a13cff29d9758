"""The package's shape: modules and functions small enough to read at once, and no import cycles.

The same counts from a shell: `python tests/test_layout.py` prints the largest modules and functions.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sharp_mlx"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 100


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def function_sizes(paths):
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"


def imports(path: Path) -> set:
    """The package modules ``path`` imports, at any depth of its code."""
    here = dotted(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` imports a module x
                found.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in KNOWN else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in KNOWN and m != dotted(path)}


KNOWN = {dotted(p) for p in modules()}


def cycles() -> list:
    graph = {dotted(p): imports(p) - {"sharp_mlx"} for p in modules()}
    found, state = [], {}

    def visit(node, stack):  # depth first; an edge back to a module still open closes a cycle
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_package_module_is_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules()}
    assert not {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}


def test_no_package_function_is_over_100_lines():
    long = [(n, where) for n, where in function_sizes(modules()) if n > MAX_FUNCTION_LINES]
    assert not long


def test_no_import_cycles():
    assert not cycles()


if __name__ == "__main__":
    print("largest modules:")
    for p in sorted(modules(), key=lambda p: -len(p.read_text().splitlines()))[:5]:
        print(f"  {len(p.read_text().splitlines()):4d} {p.relative_to(ROOT)}")
    print("largest functions (package and experiments/):")
    experiments = [p for p in (ROOT / "experiments").glob("*.py")]
    for n, where in sorted(function_sizes(modules() + experiments), reverse=True)[:5]:
        print(f"  {n:4d} {where}")
    print(f"import cycles: {cycles() or 'none'}")
