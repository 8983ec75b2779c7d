"""`planner validate`: every static check, and with a database, every statement prepared.

Findings carry file, line, column, node, code and message, and render as text
(`path:line:col: CODE message`), JSON, or GitHub workflow annotations. Every file is checked
and reported; one broken file does not hide the next. Without a database, SQL is still parsed
by PostgreSQL's own parser (pglast): a syntax error is found offline (`PLN111`), at its line
and column in the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from planner.config import CallTargets
from planner.errors import FlowFileError, QueryError
from planner.graph import CompiledFlow, compile_flow
from planner.kinds import BindEnv, kind_of, written_statements
from planner.kinds.backend import Database, Offline
from planner.lang.loader import load_spec
from planner.lang.refs import CompiledSql, Ref, name_params
from planner.lang.sqlcheck import syntax_errors
from planner.settings import Settings

if TYPE_CHECKING:
    from planner.db.catalog import Catalog


@dataclass(frozen=True)
class Finding:
    file: str
    line: int | None
    column: int | None
    node: str | None
    code: str
    message: str
    severity: str = "error"


def _from_error(exc: FlowFileError, path: Path) -> Finding:
    return Finding(exc.file or str(path), exc.line, exc.column, exc.node, exc.code, exc.message)


def check_static(path: Path, allowed: list[str] | None = None) -> tuple[CompiledFlow | None, list[Finding]]:
    """Load, compile and check one file as a run would bind it (call targets resolved)."""
    try:
        flow = compile_flow(load_spec(path))
    except FlowFileError as exc:
        return None, [_from_error(e, path) for e in exc.problems]  # each problem its own finding
    env = BindEnv(CallTargets(allowed, folder=path.parent), Offline("validation runs no node"))
    findings = [_from_error(exc, path) for node in flow.nodes.values()
                for exc in kind_of(node.kind).check(node, flow.marks, env)]
    return flow, findings + check_syntax(flow)


def check_syntax(flow: CompiledFlow) -> list[Finding]:
    """PostgreSQL's own parser (pglast) over every statement, no database needed: a syntax error
    is `PLN111`, reported at its line and column in the file (`planner.lang.sqlcheck`)."""
    return [_from_error(exc, flow.loaded.path) for exc in syntax_errors(flow.loaded, flow.nodes, written_statements(flow.loaded))]


def _at(flow: CompiledFlow, node: str | None, where: tuple[str | int, ...], code: str, message: str) -> Finding:
    line, column = flow.marks.at(where)
    return Finding(flow.marks.file, line, column, node, code, message)


async def check_database(flow: CompiledFlow, backend: Database, *, prepared: list[int] | None = None,
                         catalog: Catalog | None = None) -> list[Finding]:
    """Prepare every statement on the server; check `$node.field` against the columns returned.
    With `catalog` (the same server's), a `cache:` node whose statement is not proven pure
    (a volatile function, a view over one, a row lock...) is PLN131, naming what it calls.

    `prepared`, when given, gets the number of statements the server prepared appended to it."""
    findings: list[Finding] = []
    columns: dict[str, set[str]] = {}
    count = 0
    for name, node in flow.nodes.items():
        for index, statement in enumerate(node.sql.statements):
            where: tuple[str | int, ...] = ("nodes", name, "sql") + ((index,) if len(node.sql.statements) > 1 else ())
            count += 1
            try:
                described = await backend.describe(statement.text)
            except QueryError as exc:
                findings.append(_sql_finding(flow, name, where, statement, exc))
                continue
            findings += _param_types(flow, name, where, statement, list(described.parameter_types))
            if catalog is not None and node.sql.cache_ttl is not None and node.sql.read_only:
                effects = await catalog.effects(statement.text)
                if not effects.pure and effects.resolved:
                    findings.append(_at(flow, name, ("nodes", name, "cache"), "PLN131",
                                        f"cache: a statement with effects is never cached: it {effects.why()}"))
            if index == len(node.sql.statements) - 1:
                columns[name] = set(described.columns)
    for name, node in flow.nodes.items():
        for ref in node.refs:
            problem = _field_problem(flow, ref, columns)
            if problem:
                findings.append(_at(flow, name, ("nodes", name), "PLN410", problem))
    if prepared is not None:
        prepared.append(count - sum(1 for f in findings if f.code == "PLN400"))
    return findings


def _sql_finding(flow: CompiledFlow, node: str, where: tuple[str | int, ...], statement: CompiledSql, exc: QueryError) -> Finding:
    message = name_params(str(exc), statement)
    if exc.position is None:
        line, column = flow.marks.at(where)
    else:
        # The server counts in the compiled text ($1 for $name): lines match the file's exactly.
        offset = exc.position - 1
        line, column = flow.marks.inside(where, statement.text, offset)
        message += f" (SQL line {statement.text.count(chr(10), 0, offset) + 1})"
    return Finding(flow.marks.file, line, column, node, "PLN400", message)


# What a declared input type may be bound to; a parameter PostgreSQL could not type ("unknown")
# and `json` inputs are accepted everywhere.
_PG_TYPES = {
    "str": {"text", "varchar", "bpchar", "name", "char", "citext", "uuid", "unknown"},
    "int": {"int2", "int4", "int8", "numeric", "float4", "float8", "oid"},
    "float": {"float4", "float8", "numeric"},
    "bool": {"bool"},
    "dict": {"json", "jsonb"},
}


def _param_types(flow: CompiledFlow, node: str, where: tuple[str | int, ...], statement: CompiledSql, pg_types: list[str]) -> list[Finding]:
    """Inputs bound to parameters of another type (`phone: int` compared with a text column)."""
    out = []
    for ref, pg_type in zip(statement.params, pg_types, strict=False):
        spec = flow.inputs.get(ref.root) if not ref.path else None
        if spec is None or spec.type == "json":
            continue
        fits = pg_type.startswith("_") if spec.type == "list" else pg_type in _PG_TYPES.get(spec.type, set())
        if not fits and pg_type != "unknown":
            out.append(_at(flow, node, where, "PLN420",
                           f"{ref} is declared {spec.type} but the statement needs {pg_type} there"))
    return out


def _field_problem(flow: CompiledFlow, ref: Ref, columns: dict[str, set[str]]) -> str | None:
    """`$node.field` where `node` is SQL: does its statement return `field`?"""
    node = flow.nodes.get(ref.root)
    if node is None or not ref.path or ref.root not in columns:
        return None
    path = list(ref.path)
    if node.sql.fetch == "all":
        if not path[0].isdigit():
            return f"{ref}: node {ref.root!r} fetches all rows (a list); index it, e.g. ${ref.root}.0.{path[0]}"
        path = path[1:]
        if not path:
            return None
    if node.sql.fetch in ("value", "none"):
        return f"{ref}: node {ref.root!r} fetches {'a single value' if node.sql.fetch == 'value' else 'a status'}, which has no fields"
    if path[0] not in columns[ref.root]:
        have = ", ".join(sorted(columns[ref.root])) or "no columns"
        return f"{ref}: node {ref.root!r} returns no column {path[0]!r} (it returns: {have})"
    return None


@dataclass(frozen=True)
class Report:
    """What `validate` found, and how much it checked."""

    findings: list[Finding]
    checked: int  # files
    prepared: int  # statements the server prepared (0 without a database)


async def validate_paths(paths: list[Path], dsn: str | None, settings: Settings | None = None) -> list[Finding]:
    """Every check of every file; with `dsn`, every statement prepared on that server."""
    return (await validate_report(paths, dsn, settings)).findings


async def validate_report(paths: list[Path], dsn: str | None, settings: Settings | None = None) -> Report:
    """`validate_paths`, with the counts `planner validate` reports. `settings` (the command
    line's `Settings.from_env()`; none: every default) give the allow-list and the pooler."""
    settings = settings if settings is not None else Settings()
    allowed = list(settings.allowed_modules) if settings.allowed_modules is not None else None
    findings: list[Finding] = []
    flows: list[CompiledFlow] = []
    for path in paths:
        flow, found = check_static(path, allowed)
        findings += found
        if flow is not None:
            flows.append(flow)
    if dsn is None or not flows:
        return Report(findings, len(paths), 0)
    from planner.db.catalog import catalog_of
    from planner.db.pool import PoolBackend

    # With a server, the server judges the syntax (its parser is the one that will run the
    # statement; pglast's may be of another PostgreSQL version): no PLN111 besides its PLN400.
    findings = [f for f in findings if f.code != "PLN111"]

    prepared: list[int] = []
    backend = PoolBackend(dsn=dsn, min_size=1, max_size=1, default_pooler=settings.pooler)
    catalog = catalog_of(backend)
    try:
        for flow in flows:
            findings += await check_database(flow, backend, prepared=prepared, catalog=catalog)
    finally:
        try:
            if catalog is not None:
                await catalog.close()
        finally:
            await backend.close()
    return Report(findings, len(paths), sum(prepared))


def render_findings(findings: list[Finding], fmt: str, *, checked: int, prepared: int | None = None,
                    server: str | None = None) -> str:
    """The findings as text, JSON or GitHub annotations. With `prepared` (a database was used):
    how many statements `server` prepared: a JSON field, and on success a line (a notice on GitHub)."""
    if fmt == "json":
        data: dict[str, object] = {"checked": checked, "findings": [asdict(f) for f in findings]}
        if prepared is not None:
            data.update(prepared=prepared, server=server)
        return json.dumps(data, indent=2)
    if not findings and prepared is not None:
        done = f"{prepared} statement(s) of {checked} flow file(s) prepared on the server {server}: all accepted"
        return f"::notice title=planner validate::{_gh_data(done)}" if fmt == "github" else done
    lines = []
    for f in findings:
        where = f"{f.file}:{f.line or 1}:{f.column or 1}"
        node = f"node {f.node!r}: " if f.node else ""
        if fmt == "github":
            lines.append(_github(f, node + f.message))
        else:
            lines.append(f"{where}: {f.code} {node}{f.message}")
    return "\n".join(lines)


def _github(f: Finding, message: str) -> str:
    """One workflow command (`::error file=..,line=..::message`) that nothing in it can end early."""
    props = {"file": f.file, "line": str(f.line or 1), "col": str(f.column or 1), "title": f.code}
    spelled = ",".join(f"{key}={_gh_property(value)}" for key, value in props.items())
    return f"::error {spelled}::{_gh_data(message)}"


def _gh_data(text: str) -> str:
    """GitHub's escaping of a command's message (actions/toolkit `escapeData`): a newline would
    start a new command."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    """GitHub's escaping of a property value (`escapeProperty`): `,` would start another
    property (`file=a,line=9`) and `:` could end the properties (`::`)."""
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")
