"""The architecture, kept so: the core never imports an adapter, and no module imports
itself back through others (a cycle hidden by a function-local import is still a cycle).

Read from the source with ``ast``: every ``import`` counts, at module level or inside a
function, except those under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"gradguard": ROOT / "gradguard", "gradguard.integrations": ROOT / "integrations"}
# The command line (``gradguard demo``) is an application of the library: it may use the
# dashboard sinks, lazily, like a user would.
APPLICATIONS = ("gradguard.cli",)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The gradguard modules ``module`` imports at run time."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()

    def resolve(name: str) -> None:
        # The longest known module the dotted name starts with (``a.b.c`` imports ``a.b``).
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                stem = f"{base}.{node.module}" if node.module else base
            else:
                stem = node.module or ""
            resolve(stem)
            for alias in node.names:  # ``from . import sub`` imports the submodule
                if f"{stem}.{alias.name}" in known:
                    targets.add(f"{stem}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    targets.discard(module)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_the_core_never_imports_an_adapter() -> None:
    graph = _graph()
    offenders = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if not module.startswith(("gradguard.integrations", *APPLICATIONS))
        for target in targets
        if target.startswith("gradguard.integrations")
    ]
    assert offenders == []


def test_adapters_use_only_public_names_of_the_core() -> None:
    """An adapter reaches the core through ``gradguard``'s public API (and the documented
    helpers of the sinks), never through a private module of the guard's pipeline."""
    allowed_private = {
        "gradguard._dist",  # rank-zero checks for the sinks
        "gradguard._errors",  # the validators the sinks' constructors use
        "gradguard._events",
        "gradguard._keys",  # metric keys: the one module that formats them
        "gradguard._ratelimit",  # the rate limit of alerts
        "gradguard._stats",  # metric names
        "gradguard.report.advice",  # number formatting shared with the figures
    }
    graph = _graph()
    offenders = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("gradguard.integrations")
        for target in targets
        if not target.startswith("gradguard.integrations")
        and target != "gradguard"
        and target not in allowed_private
    ]
    assert offenders == []


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is not a cycle.
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                if not all(b.startswith(a + ".") for a, b in itertools.pairwise(cycle)):
                    cycles.append(cycle)
            elif state.get(target) is None:
                visit(target)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_real_imports() -> None:
    # The checks above are only as good as the graph: it must see the pipeline's imports.
    graph = _graph()
    assert "gradguard._step" in graph["gradguard._hostside"]
    assert "gradguard._hostside" in graph["gradguard._guard"]
    assert "gradguard.clip.base" in graph["gradguard._step"]
    assert "gradguard" in graph["gradguard.integrations.lightning"]
