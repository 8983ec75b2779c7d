"""One boundary between a DSN planner is given and asyncpg: `planner.db.pool` (`connect()` and
`PoolBackend.pool()`), which take planner's own `?pgbouncer=` parameter off and honour it.

Any other module that opens a connection itself hands the parameter to the server (or to
PgBouncer), which refuses it. Each such call is one more spelling of that defect, so the rule is
checked by parsing every module with `ast`, whatever the spelling of the call: `asyncpg.connect`,
an alias of the module, `from asyncpg import connect`, a submodule (`asyncpg.pool.create_pool`),
a reference passed on without a call, or `getattr(asyncpg, "connect")`.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "planner"
OPENERS = frozenset({"connect", "create_pool"})
BOUNDARY = ("planner/db/pool.py", "planner/db/pooler.py")  # the pool; one connection of its own


def _chain(node: ast.expr) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None for anything that is not a dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def openers(source: str) -> list[tuple[int, str]]:
    """(line, what) for each use of asyncpg's `connect` or `create_pool` in `source`."""
    tree = ast.parse(source)
    modules: set[str] = set()  # local names bound to asyncpg or one of its submodules
    functions: set[str] = set()  # local names bound to asyncpg's connect / create_pool
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "asyncpg" or alias.name.startswith("asyncpg."):
                    # `import asyncpg.pool` binds `asyncpg`; `import asyncpg.pool as p` binds `p`
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None and (
                node.module == "asyncpg" or node.module.startswith("asyncpg.")):
            for alias in node.names:
                if alias.name in OPENERS:
                    functions.add(alias.asname or alias.name)
                else:  # `from asyncpg import pool`: a submodule, perhaps
                    modules.add(alias.asname or alias.name)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in OPENERS:
            chain = _chain(node)
            if chain is not None and chain[0] in modules:
                found.append((node.lineno, ".".join(chain)))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in functions:
            found.append((node.lineno, node.id))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in OPENERS):
            chain = _chain(node.args[0])
            if chain is not None and chain[0] in modules:
                found.append((node.lineno, f"getattr({'.'.join(chain)}, {node.args[1].value!r})"))
    return sorted(found)


def test_the_finder_sees_every_spelling_of_a_connection_opened_outside_the_boundary() -> None:
    # The rule below would pass vacuously if the finder missed a spelling.
    source = textwrap.dedent("""
        import asyncpg
        import asyncpg as pg
        import asyncpg.pool
        from asyncpg import connect as open_one, create_pool
        from asyncpg.connection import connect
        from asyncpg import pool as pools

        async def f(dsn):
            await asyncpg.connect(dsn)
            await pg.create_pool(dsn)
            await asyncpg.pool.create_pool(dsn)
            await open_one(dsn)
            await create_pool(dsn)
            await connect(dsn)
            await pools.create_pool(dsn)
            opener = asyncpg.connect
            await getattr(pg, "connect")(dsn)
            other.connect(dsn)  # not asyncpg's
    """)
    assert [line for line, _ in openers(source)] == [10, 11, 12, 13, 14, 15, 16, 17, 18]


def test_no_module_but_planner_db_opens_an_asyncpg_connection_or_pool() -> None:
    found = {str(path.relative_to(ROOT)): openers(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
    assert all(found[path] for path in BOUNDARY), "the finder sees nothing at the boundary: it no longer sees the calls it should"
    outside = [f"{path}:{line}: {what}" for path, uses in found.items() if path not in BOUNDARY for line, what in uses]
    assert outside == [], ("open connections through planner.db.pooler.connect() or a PoolBackend, which take a DSN's "
                           "?pgbouncer= off and honour it: " + ", ".join(outside))
