"""The import rules of docs/architecture.md, checked by parsing every planner module with `ast`.

Layers, bottom up: language, kinds, graph, run, database, facade, tools, edges. A module
imports only its own layer or below (imports for type annotations excepted); asyncpg is
imported by `db.py`, `demo/` and `pytest_plugin.py` alone; the lower layers never reach the
engine, the facade, the database or the command line, not even for types.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "planner"

LAYERS: list[tuple[str, set[str]]] = [
    ("language", {"planner.errors", "planner.models", "planner.loader", "planner.refs", "planner.expr", "planner.sqlinfo",
                  "planner.scheduler", "planner.backend", "planner.results", "planner.telemetry"}),
    ("kinds", {"planner.kinds", "planner.kinds.sql", "planner.kinds.call", "planner.config"}),
    ("graph", {"planner.graph"}),
    ("run", {"planner.policy", "planner.observers", "planner.executor"}),
    ("database", {"planner.db", "planner.coalesce", "planner.cache", "planner.fuse", "planner.dsn",
                  "planner.replica"}),
    ("facade", {"planner.api"}),
    ("tools", {"planner.validate", "planner.schema", "planner.render", "planner.draw", "planner.trace", "planner.stats"}),
    ("edges", {"planner", "planner.__main__", "planner.cli", "planner.pytest_plugin", "planner.demo", "planner.demo.data",
               "planner.demo.escalation", "planner.demo.latency_proxy", "planner.demo.run", "planner.testing"}),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
LOWER = {m for _, modules in LAYERS[:3] for m in modules}  # language, kinds, graph
NEVER_FROM_LOWER = {"planner.executor", "planner.api", "planner.db", "planner.cli", "planner"}
ASYNCPG_ALLOWED = {"planner.db", "planner.pytest_plugin"}  # and planner.demo.*


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
    assert set(MODULES) == set(RANK), "a module was added or removed: give it a layer here and in docs/architecture.md"


def test_the_parser_sees_the_imports_it_should() -> None:
    # The checks below would pass vacuously if the parser found nothing.
    seen = {(i.module, i.target, i.typing_only) for i in IMPORTS}
    assert ("planner.db", "asyncpg", False) in seen
    assert ("planner.executor", "planner.policy", False) in seen  # `from planner import policy`
    assert ("planner.kinds.sql", "planner.graph", True) in seen  # under TYPE_CHECKING
    assert ("planner.api", "planner.db", False) in seen  # lazily, inside Planner.__init__
    assert ("planner.kinds", "planner.kinds.sql", False) in seen  # lazily, inside _registry()


def test_modules_import_only_their_own_layer_or_below() -> None:
    upward = [
        f"{i.module} (layer {LAYERS[RANK[i.module]][0]}) imports {i.target} (layer {LAYERS[RANK[i.target]][0]}) at line {i.line}"
        for i in IMPORTS
        if not i.typing_only and i.target in RANK and RANK[i.target] > RANK[i.module]
    ]
    assert upward == []


def test_only_the_database_module_the_demo_and_the_pytest_plugin_import_asyncpg() -> None:
    importers = {i.module for i in IMPORTS if i.target == "asyncpg"}
    assert "planner.db" in importers
    assert {m for m in importers if m not in ASYNCPG_ALLOWED and not m.startswith("planner.demo")} == set()


@pytest.mark.parametrize("module", sorted(LOWER))
def test_the_lower_layers_never_import_the_engine_the_facade_the_database_or_the_cli(module: str) -> None:
    bad = [f"{i.target} at line {i.line}" for i in IMPORTS if i.module == module and i.target in NEVER_FROM_LOWER]
    assert bad == [], f"{module} imports {bad}"


def test_the_scheduler_and_the_backend_protocol_import_no_other_layer() -> None:
    for module in ("planner.scheduler", "planner.backend"):
        runtime = {i.target for i in IMPORTS if i.module == module and not i.typing_only and i.target.startswith("planner")}
        assert runtime <= {"planner.errors"}, f"{module}: {runtime}"


def test_only_the_cli_imports_typer() -> None:
    assert {i.module for i in IMPORTS if i.target == "typer"} == {"planner.cli"}


def test_importing_planner_and_running_a_flow_offline_never_loads_asyncpg() -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from planner import Planner, load_flow
        from planner.backend import Offline
        from planner.validate import check_static

        flow = load_flow(text="nodes:\\n  a: {sql: SELECT 1}\\n  b: {call: 'tests.nodes:add', with: {a: 1, b: 2}}\\n")
        result = asyncio.run(Planner(backend=Offline(), allowed_modules=["tests"]).run(flow, overrides={"a": 0}))
        assert result.values == {"a": 0, "b": 3}, result.values
        loaded = sorted(m for m in sys.modules if m == "asyncpg" or m.startswith("asyncpg.") or m == "planner.db")
        print(loaded)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
