"""The package keeps the layout of DESIGN.md ("Layout"): one folder per job, short modules, no
import cycle (lazy imports inside functions count too), `core/` on its own, and Dagster only
in the folders that wrap it. Read from the source with `ast`; nothing is imported."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "embedding_assets"
FOLDERS = {
    "config",
    "core",
    "embedders",
    "state",
    "destinations",
    "sync",
    "defs",
    "ops",
    "worker",
    "cli",
    "data",
}
TOP_LEVEL_MODULES = {"__init__.py", "definitions.py"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# Folders whose code is plain Python: Dagster wraps them, they never import it.
WITHOUT_DAGSTER = {"core", "config", "embedders", "state", "destinations", "sync", "worker"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imported(name: str) -> Iterator[str]:
    """Every module `name` imports, at the top or inside a function (`from pkg import mod`
    counts as importing `pkg.mod`)."""
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                yield child if child in MODULES else node.module


def package_imports(name: str) -> set[str]:
    return {m for m in imported(name) if m in MODULES and m != name}


def test_only_the_definitions_at_the_top_level() -> None:
    modules = {p.name for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert modules == TOP_LEVEL_MODULES
    assert folders == FOLDERS


def test_modules_are_short() -> None:
    long = {
        name: lines
        for name, path in MODULES.items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: split them by job"


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def nested_functions(node: ast.AST) -> Iterator[ast.AST]:
    """The functions defined directly inside `node` (not inside those)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, FUNCTIONS):
            yield child
        else:
            yield from nested_functions(child)


def function_lengths(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(name, lines) of every function; a function's lines leave out the functions nested in
    it (an asset or a check defined in its builder), which are measured on their own."""
    for node in ast.walk(tree):
        if isinstance(node, FUNCTIONS):
            yield node.name, span(node) - sum(span(f) for f in nested_functions(node))


def test_functions_are_short() -> None:
    long = {
        f"{name}.{function}": lines
        for name, tree in TREES.items()
        for function, lines in function_lengths(tree)
        if lines > MAX_FUNCTION_LINES
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines"


def test_no_import_cycle() -> None:
    graph = {name: package_imports(name) for name in MODULES}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:  # Tarjan's strongly connected components
        order[name] = low[name] = len(order)
        stack.append(name)
        for other in graph[name]:
            if other not in order:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], order[other])
        if low[name] == order[name]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in order:
            visit(name)
    assert not cycles


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if n.startswith("embedding_assets.core"))
)
def test_core_imports_only_core(name: str) -> None:
    outer = {m for m in package_imports(name) if not m.startswith("embedding_assets.core")}
    assert not outer, f"{name} imports {outer}: core/ has no I/O and no outer folder"


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if n.split(".")[1:2] and n.split(".")[1] in WITHOUT_DAGSTER)
)
def test_plain_folders_do_not_import_dagster(name: str) -> None:
    assert not any(m == "dagster" or m.startswith("dagster.") for m in imported(name))


def test_imports_inside_functions_count() -> None:
    """The walk finds imports inside functions, where a cycle would otherwise hide."""
    tree = ast.parse("def f():\n    from embedding_assets.sync import runtime\n")
    TREES["embedding_assets.__probe__"] = tree
    MODULES["embedding_assets.__probe__"] = PACKAGE / "__probe__.py"
    try:
        assert package_imports("embedding_assets.__probe__") == {"embedding_assets.sync.runtime"}
    finally:
        del TREES["embedding_assets.__probe__"], MODULES["embedding_assets.__probe__"]
