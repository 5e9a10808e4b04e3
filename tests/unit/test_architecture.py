"""The tree shows the architecture: what the layer ships, which way its imports point.

The layer (``layers/cachevault/python/cachevault``) is what Lambdas and ECS workers run; the
tools package (``tools/cachevault_tools``: CLI, embedded AWS, bench, demo) never ships to
Lambda. Inside the layer, steps depend on stages, stages on core, never the other way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYER_ROOT = ROOT / "layers/cachevault/python"
LAYER = LAYER_ROOT / "cachevault"
TOOLS_PACKAGE = "cachevault_tools"
# Lower ranks never import higher ones (same rank: allowed, as long as there is no cycle).
RANKS = {"core": 0, "catalog": 1, "nodes": 1, "rdb": 1, "snapshot": 2, "restore": 2, "ops": 3}
LAYER_BUDGET_BYTES = 1_500_000


def _modules() -> dict[str, Path]:
    found = {}
    for path in LAYER_ROOT.rglob("*.py"):
        rel = path.relative_to(LAYER_ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every absolute import of a module, function-level (lazy) imports included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                yield candidate if candidate in modules else node.module


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {t for t in _imports(path, modules) if t in modules and t != name and not name.startswith(t + ".")}
        for name, path in modules.items()
    }


def test_the_layer_never_imports_the_tools_package() -> None:
    modules = _modules()
    offenders = sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in _imports(path, modules)
        if target == TOOLS_PACKAGE or target.startswith(TOOLS_PACKAGE + ".")
    )
    assert offenders == []


def test_functions_import_only_the_layer() -> None:
    modules = _modules()
    offenders = sorted(
        f"{app.relative_to(ROOT)} imports {target}"
        for app in (ROOT / "functions").glob("*/app.py")
        for target in _imports(app, modules)
        if target.startswith(TOOLS_PACKAGE)
    )
    assert offenders == []


def test_no_import_cycles_in_the_layer() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    assert cycles == []


def test_dependencies_point_from_steps_to_stages_to_core() -> None:
    def rank(module: str) -> int | None:
        parts = module.split(".")
        return RANKS.get(parts[1]) if len(parts) > 2 else None

    upward = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if rank(name) is not None and rank(target) is not None and rank(target) > rank(name)  # type: ignore[operator]
    )
    assert upward == []


def test_every_layer_package_says_what_it_owns() -> None:
    for init in LAYER.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 20, f"{init.relative_to(ROOT)} has no docstring saying what it owns"


def test_the_layer_stays_small() -> None:
    files = [p for p in LAYER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    size = sum(p.stat().st_size for p in files)
    print(f"layer: {len(files)} files, {size / 1024:.0f} KiB")  # shown with pytest -s / -rP
    assert all(p.suffix == ".py" for p in files), "the layer ships Python modules only"
    assert size < LAYER_BUDGET_BYTES
