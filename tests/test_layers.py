"""The import rules of docs/architecture.md, checked by parsing every planner module with `ast`.

The package is laid out by layer, bottom up: base (results, errors, config), lang/, kinds/,
graph, run/, db/, api, views/, edges (the package itself, cli/, testing/, demo/). A module
belongs to the layer of its package (or, at the top, of its own name), and imports only its
own layer or below, imports made for type annotations included. There is no import circle
between modules. asyncpg is imported by db/, demo/ and the pytest plugin alone; typer by cli/.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "planner"

# Each layer is a list of units: a package (with everything under it) or a top-level module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("planner.results", "planner.errors", "planner.config")),
    ("lang", ("planner.lang",)),
    ("kinds", ("planner.kinds",)),
    ("graph", ("planner.graph", "planner.compile")),
    ("run", ("planner.run",)),
    ("db", ("planner.db",)),
    ("facade", ("planner.flows", "planner.api", "planner.settings")),
    ("views", ("planner.views",)),
    ("edges", ("planner", "planner.__main__", "planner.cli", "planner.testing", "planner.demo")),
]
UNIT_RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
ASYNCPG_ALLOWED = ("planner.db", "planner.demo", "planner.testing.pytest_plugin")


def layer_of(module: str) -> int | None:
    """The rank of `module`'s layer: its longest unit prefix (`planner` itself only for the package)."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        rank = UNIT_RANK.get(".".join(parts[:end]))
        if rank is not None:
            return rank
    return UNIT_RANK["planner"] if module == "planner" else None


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # a planner module, or a top-level distribution (asyncpg, typer...)
    typing_only: bool
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str:
    """`planner.kinds.sql.SQL` -> `planner.kinds.sql`; `asyncpg.pool` -> `asyncpg`."""
    if not name.startswith("planner"):
        return name.split(".")[0]
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return "planner"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_one(stmt, True)
                for stmt in child.orelse:
                    visit_one(stmt, typing_only)
                continue
            visit_one(child, typing_only)

    def visit_one(node: ast.AST, typing_only: bool) -> None:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from planner import policy` imports the submodule; `from planner import Planner` the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            resolved = _resolve(target)
            if resolved != module:
                found.append(Import(module, resolved, typing_only, getattr(node, "lineno", 0)))
        visit(node, typing_only)

    visit(tree, False)
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def test_every_planner_module_has_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert unplaced == [], "a module outside every layer: put it in a package of its layer, or give it one here and in docs/architecture.md"


def test_the_parser_sees_the_imports_it_should() -> None:
    # The checks below would pass vacuously if the parser found nothing.
    seen = {(i.module, i.target, i.typing_only) for i in IMPORTS}
    assert ("planner.db.pool", "asyncpg", False) in seen
    assert ("planner.run.executor", "planner.run.policy", False) in seen  # `from planner.run import policy`
    assert ("planner.kinds.sql", "planner.lang.nodes", True) in seen  # under TYPE_CHECKING
    assert ("planner.db.stack", "planner.db.pool", False) in seen  # lazily, inside build_stack
    assert ("planner.kinds", "planner.kinds.sql", False) in seen  # lazily, inside _registry()


def test_no_module_imports_a_higher_layer_not_even_for_types() -> None:
    upward = [
        f"{i.module} (layer {LAYERS[layer_of(i.module) or 0][0]}) imports {i.target} "
        f"(layer {LAYERS[layer_of(i.target) or 0][0]}) at line {i.line}{' (for types)' if i.typing_only else ''}"
        for i in IMPORTS
        if i.target in MODULES and (layer_of(i.target) or 0) > (layer_of(i.module) or 0)
    ]
    assert upward == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    # A package's __init__ that registers or re-exports its own children is not an arrow back
    # from them (the kinds registry imports kinds/sql.py, which imports the protocol from it).
    graph = nx.DiGraph((i.module, i.target) for i in IMPORTS
                       if i.target in MODULES and i.target != "planner" and not i.target.startswith(i.module + "."))
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert circles == []


def test_only_the_database_package_the_demo_and_the_pytest_plugin_import_asyncpg() -> None:
    importers = {i.module for i in IMPORTS if i.target == "asyncpg"}
    assert "planner.db.pool" in importers
    assert {m for m in importers if not m.startswith(ASYNCPG_ALLOWED)} == set()


def test_the_scheduler_and_the_backend_protocol_import_no_other_layer() -> None:
    allowed = {"planner.run.scheduler": set(),
               "planner.kinds.backend": {"planner.errors", "planner.results", "planner.lang.nodes"}}
    for module, permitted in allowed.items():
        runtime = {i.target for i in IMPORTS if i.module == module and not i.typing_only and i.target.startswith("planner")}
        assert runtime <= permitted, f"{module}: {runtime}"


# Who may read the environment: the facade (`planner.settings` reads it once, `Settings.from_env`)
# and the edges. Everything else gets its values passed in. The embedded server's data folder
# (`PLANNER_HOME`) is the one exception: where that server lives is for every process on the
# machine to agree on, not a setting of one Planner (see `planner_home`'s docstring).
ENVIRONMENT_READERS = ("planner.api", "planner.settings", "planner.cli", "planner.demo", "planner.testing")
ENVIRONMENT_EXCEPTIONS = {("planner.db.embedded", "planner_home")}
_ENVIRON_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _environment_reads(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of each use of `os.environ` / `os.getenv` (or their imports)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else where
            if (isinstance(child, ast.Attribute) and child.attr in _ENVIRON_NAMES
                    and isinstance(child.value, ast.Name) and child.value.id == "os"):
                found.append((where, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.module == "os" and \
                    any(alias.name in _ENVIRON_NAMES for alias in child.names):
                found.append((where, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), "<module>")
    return found


def test_the_environment_is_read_by_the_facade_and_the_edges_alone() -> None:
    readers = {(module, where, line) for module, path in MODULES.items()
               if module != "planner" and not module.startswith(ENVIRONMENT_READERS)
               for where, line in _environment_reads(path)}
    assert {(m, w) for m, w, _ in readers} == ENVIRONMENT_EXCEPTIONS, sorted(readers)


def test_the_environment_check_sees_each_spelling(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import os\nfrom os import environ\nA = os.environ.get('X')\n"
                      "def f():\n    return os.getenv('Y')\n")
    assert _environment_reads(sample) == [("<module>", 2), ("<module>", 3), ("f", 5)]


def test_only_the_cli_imports_typer() -> None:
    importers = {i.module for i in IMPORTS if i.target == "typer"}
    assert importers and all(m == "planner.cli" or m.startswith("planner.cli.") for m in importers), importers


@pytest.mark.subprocess
def test_importing_planner_and_running_a_flow_offline_never_loads_asyncpg() -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from planner import CallOptions, Planner, load_flow
        from planner.kinds.backend import Offline
        from planner.views.validate import check_static

        flow = load_flow(text="nodes:\\n  a: {sql: SELECT 1}\\n  b: {call: 'tests.nodes:add', with: {a: 1, b: 2}}\\n")
        result = asyncio.run(Planner(backend=Offline(), call_options=CallOptions(allowed_modules=["tests"])).run(flow, overrides={"a": 0}))
        assert result.values == {"a": 0, "b": 3}, result.values
        loaded = sorted(m for m in sys.modules if m == "asyncpg" or m.startswith("asyncpg.") or m == "planner.db.pool")
        print(loaded)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
