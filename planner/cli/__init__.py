"""The `planner` command line: thin commands over the library.

Exit codes follow sqlfluff and dbt: 0 ok, 1 findings or a failed run, 2 usage, environment or
internal error. Data goes to stdout, diagnostics to stderr; Rich is used only on a terminal
(and honours NO_COLOR). No command ever shows a traceback (set PLANNER_DEBUG=1 to see one).
No password of a DSN is ever printed: every message goes through `planner.db.dsn.redact_text`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from planner.db.dsn import dsn_secrets, redact_text
from planner.errors import (
    DatabaseUnavailable,
    FlowDatabaseLost,
    FlowError,
    FlowFailed,
    FlowFileError,
    FlowInputError,
)
from planner.results import error_text
from planner.views.render import plain

app = typer.Typer(
    name="planner",
    help="Run YAML flows of database lookups, each as soon as what it needs has settled.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from planner import __version__

        typer.echo(f"planner {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print planner's version and exit.")] = False,
) -> None:
    """Options of `planner` itself (the app's help text is Typer's `help=` above)."""


FlowsOpt = Annotated[Path | None, typer.Option("--flows", help="Folder of flows (default: $PLANNER_FLOWS or ./flows).")]
DbOpt = Annotated[str | None, typer.Option("--db", help="PostgreSQL DSN (default: $DATABASE_URL, else the embedded server).")]
ERROR_CELL = 100  # characters of a node's error in `planner run`'s table; the rest is printed below it


class UsageError(Exception):
    """A mistake in the command line itself: exit 2."""


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"planner: {_one_line(_redact(message))}", err=True)
    sys.exit(code)


def _one_line(text: str) -> str:
    """An error on one line, as scripts and CI annotations read it: asyncpg's DETAIL and HINT
    lines are joined to the first."""
    return plain(" / ".join(line.strip() for line in text.splitlines() if line.strip()))


def _secrets() -> set[str]:
    """The passwords this process was given (`--db`, the database variables), to hide wherever
    they turn up: a parser's error can quote a piece of one without the DSN around it."""
    dsns = [os.environ.get(name, "") for name in ("DATABASE_URL", "DATABASE_REPLICA_URL")]
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--db" and i + 1 < len(args):
            dsns.append(args[i + 1])
        elif arg.startswith("--db="):
            dsns.append(arg.removeprefix("--db="))
    return {secret for dsn in dsns for secret in dsn_secrets(dsn)}


def _redact(text: str) -> str:
    return redact_text(text, _secrets())


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _is_tty() -> bool:
    return sys.stdout.isatty()


def print_table(title: str | None, headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> None:
    """A Rich table on a terminal, plain aligned columns in a pipe. One line per row, whatever
    the cells hold (a `when:` over several lines, control characters)."""
    right = right or set()
    rows = [[plain(cell) for cell in row] for row in rows]
    if _is_tty():
        from rich.table import Table
        from rich.text import Text

        # Text, not str: Rich would read `[red]` or `[/x]` in a cell as markup, or fail on it.
        table = Table(title=None if title is None else Text(plain(title)), title_justify="left")
        for i, header in enumerate(headers):
            table.add_column(header, justify="right" if i in right else "left")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        _console().print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    if title:
        typer.echo(plain(title))
    typer.echo(line(headers))
    typer.echo(line(["-" * w for w in widths]))
    for row in rows:
        typer.echo(line(row))


def _shown_dsn(dsn: str, *, password: bool = False) -> str:
    """A DSN to print: no password (masked `***`) unless `password`, otherwise whole, so that it
    works when pasted (psql, DATABASE_URL): the socket folder of `?host=` kept (percent-encoded
    where it must be), an empty password dropped (`postgres:@` -> `postgres@`)."""
    from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if "://" in dsn and parts.scheme.startswith("postgres"):
        netloc = parts.netloc
        user, at, host = netloc.rpartition("@")
        if at and user.endswith(":") and user.count(":") == 1:
            netloc = f"{user[:-1]}@{host}"
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='/:,@')}" for k, v in parse_qsl(parts.query, keep_blank_values=True))
        dsn = urlunsplit(parts._replace(netloc=netloc, query=query))
    return dsn if password else _redact(dsn)


def _on_database(dsn: str, database: str) -> str:
    """The same server, database `database` (a URL's path, or libpq's `dbname=`)."""
    from planner.db.admin import with_database

    return with_database(dsn, database) if "://" in dsn else f"{dsn} dbname={database}"


def _resolve_flow(flow: str, flows: Path | None) -> tuple[Path, str]:
    """A flow given by name (looked up in the flows folder) or by path."""
    if flow.endswith((".yaml", ".yml")) or os.sep in flow:
        path = Path(flow)
        if not path.exists():
            raise UsageError(f"no such flow file: {flow}")
        return path.parent, path.stem
    folder = flows or Path(os.environ.get("PLANNER_FLOWS", "flows"))
    if not any((folder / f"{flow}{s}").exists() for s in (".yaml", ".yml")):
        from planner.config import FlowSource, did_you_mean

        known = [p.stem for p in FlowSource(folder).paths()] if folder.is_dir() else []
        hint = did_you_mean(flow, known) or " (give a name from --flows or a path to a .yaml file)"
        raise UsageError(f"no flow named {flow!r} in {folder}/{hint}")
    return folder, flow


def _planner(folder: Path, db: str | None) -> Any:
    from planner.api import Planner

    return Planner(flows=folder, dsn=db)


def _parse_inputs(planner: Any, name: str, pairs: list[str], file: Path | None) -> dict[str, Any]:
    flow = planner.load(name)
    values: dict[str, Any] = {}
    if file is not None:
        try:
            given = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--inputs {file}: {exc}") from None
        if not isinstance(given, dict):
            raise UsageError(f"--inputs {file}: must hold a JSON object of input names to values")
        values.update(given)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-i {pair!r}: write key=value")
        spec = flow.inputs.get(key)
        if spec is None:
            from planner.config import did_you_mean

            hint = did_you_mean(key, flow.inputs) or f" (inputs: {', '.join(flow.inputs) or 'none'})"
            raise UsageError(f"-i {key}: flow {name!r} has no input {key!r}{hint}")
        values[key] = _convert(key, raw, spec.type)
    return values


def _convert(key: str, raw: str, kind: str) -> Any:
    try:
        if kind == "str":
            return raw
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        return json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"-i {key}={raw!r}: not a valid {kind} ({exc})") from None


# --- commands -------------------------------------------------------------------------------


@app.command()
def run(
    flow: Annotated[str, typer.Argument(help="Flow name or path to a .yaml file.")],
    inputs: Annotated[list[str] | None, typer.Option("-i", "--input", help="An input, key=value; typed by the flow.")] = None,
    inputs_file: Annotated[Path | None, typer.Option("--inputs", help="A JSON file of inputs.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="eager, layered or sequential.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    trace: Annotated[Path | None, typer.Option("--trace", help="Write a Chrome trace-event JSON of the run.")] = None,
    allow_defaults: Annotated[bool, typer.Option("--allow-defaults", help="Exit 0 even when a node failed and took its default.")] = False,
    flows: FlowsOpt = None,
    db: DbOpt = None,
) -> None:
    """Run a flow once and show each node's outcome.

    Exits 1 when the run failed, and also when any node failed and was settled by its default
    (a degraded run) unless --allow-defaults is given; 2 when the database went away.

    Example: planner run process_buffered -i instance_name=acme -i user_phone=+15550000001 -i message=hi
    """
    folder, name = _resolve_flow(flow, flows)

    async def go() -> tuple[Any, Any, int, Any]:
        async with _planner(folder, db) as planner:
            values = _parse_inputs(planner, name, inputs or [], inputs_file)
            try:
                result = await planner.run(name, values, mode=mode)
                code = 0
            except FlowFailed as exc:  # FlowDatabaseLost: the environment's failure, not the flow's
                result, code = exc.result, 2 if isinstance(exc, FlowDatabaseLost) else 1
            return planner.load(name), result, code, planner.cache_stats()

    compiled, result, code, cache = asyncio.run(go())
    from planner.views import stats

    try:
        stats.record(result, folder)
    except OSError as exc:  # statistics are a convenience: never fail a run over them
        typer.echo(f"planner: could not record latencies: {exc}", err=True)
    if trace is not None:
        from planner.views.trace import write_trace

        write_trace(result, compiled, trace)
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps({**result.to_json(), "cache": asdict(cache)}, indent=2, default=str))  # data: printed exactly, never redacted
    else:
        rows, details = _run_table(compiled, result)
        print_table(f"{name}: {result.status} in {result.elapsed_ms:.1f} ms ({result.mode})",
                    ["node", "group", "state", "ms", "tries", "error"], rows, right={1, 3, 4})
        for node, error in details:
            lines = [plain(line) for line in error.splitlines()]
            typer.echo(f"\n{node}: {lines[0]}" + "".join(f"\n  {line}" for line in lines[1:]))
        if result.output is not None:
            from planner.results import jsonable

            typer.echo("\n" + json.dumps(jsonable(result.output), indent=2))  # a blank line ends the table
    code = _run_verdict(name, result, code, allow_defaults)
    if code:
        raise typer.Exit(code)


def _run_verdict(name: str, result: Any, code: int, allow_defaults: bool) -> int:
    """`planner run`'s last words on stderr, and its exit code: a failed run, a lost database,
    a degraded run (unless allowed), and every node whose error looks like a bug in the flow."""
    from planner.results import bug_reason, is_bug

    for node_name, node in result.nodes.items():
        if is_bug(node.error):
            typer.echo(f"planner: node {node_name!r} looks like a bug in the flow ({bug_reason(node.error)}): "
                       "no retry can fix it; fix the flow", err=True)
    if code == 2:
        failed = next((n for n, node in result.nodes.items() if node.state.value == "failed"), None)
        typer.echo(f"planner: flow {name!r} failed: node {failed!r} lost its database connection "
                   "(the database, not the flow, is the problem)", err=True)
        return code
    if code:
        typer.echo(f"planner: flow {name!r} {result.status}", err=True)
        return code
    if result.degraded:
        nodes = ", ".join(n for n, node in result.nodes.items() if node.state.value == "defaulted")
        if allow_defaults:
            typer.echo(f"planner: flow {name!r} ran degraded: defaulted {nodes} (accepted: --allow-defaults)", err=True)
            return 0
        typer.echo(f"planner: flow {name!r} ran degraded: defaulted {nodes}; exit 1 "
                   "(pass --allow-defaults to accept defaulted nodes)", err=True)
        return 1
    return 0


def _run_table(compiled: Any, result: Any) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """`planner run`'s rows, in the plan's group order, one line each; and, for each error the
    table could not show whole (asyncpg's DETAIL and HINT lines, a long message), the error."""
    from planner.results import bug_reason, is_bug

    rows, details = [], []
    for name in (n for group in compiled.groups for n in group if n in result.nodes):
        node = result.nodes[name]
        error = "" if node.error is None else _redact(error_text(node.error))
        if is_bug(node.error):
            error = f"bug ({bug_reason(node.error)}): {error}"
        first = error.splitlines()[0] if error else ""
        cell = first if len(first) <= ERROR_CELL else first[: ERROR_CELL - 3] + "..."
        if cell != error:
            cell += "" if cell.endswith("...") else " ..."
            details.append((name, error))
        duration = "" if node.duration_ms is None else f"{node.duration_ms:.1f}"
        rows.append([name, str(compiled.group_of[name]), node.state.value, duration, str(node.attempts), cell])
    return rows, details


@app.command()
def plan(
    flow: Annotated[str, typer.Argument(help="Flow name or path to a .yaml file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    flows: FlowsOpt = None,
) -> None:
    """Show the parallel groups, the critical path and the expected gain.

    Example: planner plan process_buffered
    """
    from planner.compile import compile_enabled, compiled_trips, plan_groups
    from planner.graph import plan as make_plan
    from planner.graph import trips
    from planner.views.render import estimate, ms_number, plan_json, plan_rows
    from planner.views.stats import recorded_fused, recorded_latencies

    folder, name = _resolve_flow(flow, flows)
    compiled = _planner(folder, None).load(name)
    recorded = recorded_latencies(name, folder)
    p = make_plan(compiled, recorded, recorded_fused(name, folder))  # a fused statement's time counted once
    est = estimate(compiled, p, recorded)
    cold, warm = trips(compiled), trips(compiled, warm=True)
    groups = plan_groups(compiled) if compile_enabled() else ()
    cold_c, warm_c = compiled_trips(compiled, groups), compiled_trips(compiled, groups, warm=True)
    if as_json:
        data = plan_json(compiled, p, recorded=recorded)
        data["round_trips"] = {"statements": cold.statements, "critical": cold.critical,
                               "statements_cache_warm": warm.statements, "critical_cache_warm": warm.critical,
                               "fused": [list(g) for g in cold.fused_groups],
                               "compiled": {"statements": cold_c.statements, "critical": cold_c.critical,
                                            "statements_cache_warm": warm_c.statements,
                                            "critical_cache_warm": warm_c.critical,
                                            "groups": {g.label: list(g.names) for g in groups}}}
        typer.echo(json.dumps(data, indent=2))
        return
    mixed = est.source == "recorded runs and latency: hints"  # then each figure says which it is
    rows = []
    for r in plan_rows(compiled, p, recorded):
        expected = "?" if r.expected_ms is None else ms_number(r.expected_ms)
        if mixed and r.latency_from:
            expected += " (recorded)" if r.latency_from == "recorded" else " (hint)"
        rows.append([r.node, r.kind, ", ".join(r.waits_for) or "-", str(r.group), expected, "*" if r.critical else "", r.when or ""])
    title = f"expected times from {est.source}" if est.known else "no latency known"
    print_table(f"{name}: {len(p.groups)} groups, {title}",
                ["node", "kind", "waits for", "group", "expected ms", "critical", "when"], rows, right={3, 4})
    if est.known:
        typer.echo(f"critical path: {' -> '.join(est.critical_path)}")
    typer.echo(est.summary())
    typer.echo(_trips_line(cold, warm))
    if groups:
        typer.echo("compiled (" + ", ".join(f"{g.label}: {'+'.join(g.names)}" for g in groups) + "): "
                   + _trips_line(cold_c, warm_c, fused=False) + " (planner explain shows the statements)")
    if est.unknown:
        typer.echo(f"no latency hint or record for: {', '.join(est.unknown)} (counted as 0)", err=True)


def _trips_line(cold: Any, warm: Any, *, fused: bool = True) -> str:
    """`statements per run: at most 7 (5 with the cache warm); longest chain of round trips: 4 (3 ...)`"""
    line = f"statements per run: at most {cold.statements}"
    if (warm.statements, warm.critical) != (cold.statements, cold.critical):
        line += f" ({warm.statements} with the cache warm)"
    line += f"; longest chain of round trips: {cold.critical}"
    if warm.critical != cold.critical:
        line += f" ({warm.critical} with the cache warm)"
    if cold.fused_groups and fused:
        line += "; fused: " + ", ".join("+".join(g) for g in cold.fused_groups)
    return line


@app.command()
def explain(
    flow: Annotated[str, typer.Argument(help="Flow name or path to a .yaml file.")],
    flows: FlowsOpt = None,
) -> None:
    """Print each compiled statement of a flow, its parameters, and why other SQL nodes go alone.

    Each statement can be pasted into psql (`PREPARE q AS ...; EXPLAIN EXECUTE q(...)`).
    Example: planner explain process_buffered
    """
    from planner.compile import explain as explain_flow
    from planner.compile import variant

    folder, name = _resolve_flow(flow, flows)
    compiled = _planner(folder, None).load(name)
    groups, alone = explain_flow(compiled)
    if not groups:
        typer.echo(f"{name}: no compiled statement (each SQL node is its own statement)")
    shown = list(groups)
    for group in groups:  # with the cache warm: the cached members are answered before it is sent
        cached = frozenset(n.name for n in group.nodes if n.cache_ttl is not None)
        warm = variant(compiled, group, cached) if cached else None
        if warm is not None:
            shown.append(warm)
    for group in shown:
        answered = ", ".join(n.name for n in group.nodes if n.name in group.known)
        known = f" with {answered} from the cache" if group.known else ""
        typer.echo(f"-- {group.label}{known}: {', '.join(m.name for m in group.members)} (one statement, one transaction"
                   + (f"; timeout {group.timeout * 1000:g} ms" if group.timeout is not None else "") + ")")
        for i, param in enumerate(group.params, start=1):
            what = (str(param.ref) if param.kind == "ref" else f"literal {param.value!r}" if param.kind == "lit"
                    else f"whether {param.member} runs, as its when: and references outside the statement say")
            typer.echo(f"--   ${i}: {what}")
        typer.echo(group.text + ";\n")
    for node, why in alone.items():
        typer.echo(f"-- {node} goes alone: {why}")
    if not compile_enabled_now():
        typer.echo("-- PLANNER_COMPILE=0 is set: this process compiles nothing", err=True)


def compile_enabled_now() -> bool:
    from planner.compile import compile_enabled

    return compile_enabled()


@app.command()
def visualize(
    flow: Annotated[str, typer.Argument(help="Flow name or path to a .yaml file.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="mermaid, dot, svg or html.")] = "mermaid",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write to this file instead of stdout.")] = None,
    trace: Annotated[Path | None, typer.Option("--trace", help="A trace from `planner run --trace`: colour nodes by state.")] = None,
    flows: FlowsOpt = None,
) -> None:
    """Draw the graph: nodes by group, left to right, the critical path marked.

    Example: planner visualize process_buffered --format html -o graph.html
    """
    from planner.graph import plan as make_plan
    from planner.views import render
    from planner.views.stats import recorded_fused, recorded_latencies

    if fmt not in ("mermaid", "dot", "svg", "html"):
        raise UsageError(f"--format {fmt!r}: choose mermaid, dot, svg or html")
    folder, name = _resolve_flow(flow, flows)
    compiled = _planner(folder, None).load(name)
    recorded = recorded_latencies(name, folder)  # as `planner plan` does: records first, then hints
    p = make_plan(compiled, recorded, recorded_fused(name, folder))
    run_data = None
    if trace is not None:
        from planner.views.trace import TraceError, read_trace

        try:
            run_data = read_trace(trace, compiled)
        except TraceError as exc:
            raise UsageError(f"--trace {exc}") from None
    try:
        if fmt == "mermaid":
            text = render.mermaid(compiled, p, run_data, recorded=recorded)
        elif fmt == "dot":
            text = render.dot(compiled, p, run_data, recorded=recorded)
        else:
            from planner.views import draw

            draw_as = draw.svg if fmt == "svg" else draw.html
            text = draw_as(compiled, p, run_data, recorded=recorded)
    except render.RenderError as exc:
        raise UsageError(str(exc)) from None
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {output}", err=True)


@app.command()
def validate(
    flow_args: Annotated[list[str] | None, typer.Argument(metavar="[FLOW|DIR]...", help="Flows (names or paths) or folders of flows; default: every flow of --flows.")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Also prepare every statement on this database (DATABASE_URL is not read: write --db \"$DATABASE_URL\").")] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json or github.")] = "text",
    flows: FlowsOpt = None,
) -> None:
    """Check flows: YAML, schema, references, cycles, call targets, SQL syntax; with --db, against the real schema.

    Without --db nothing is sent anywhere: SQL is parsed by PostgreSQL's own parser (pglast),
    offline. With --db, every statement is also prepared on that server.

    Example: planner validate --db postgresql://localhost/app
    """
    from planner.views.validate import render_findings, validate_report

    if fmt not in ("text", "json", "github"):
        raise UsageError(f"--format {fmt!r}: choose text, json or github")
    paths = _validate_targets(flow_args or [], flows)
    report = asyncio.run(validate_report(paths, db))
    findings = report.findings
    out = render_findings(findings, fmt, checked=len(paths), prepared=None if db is None else report.prepared,
                          server=None if db is None else _shown_dsn(db))
    if out:
        typer.echo(out)  # with --db and no findings: how many statements the server prepared
    if findings:
        typer.echo(f"planner: {len(findings)} problem(s) in {len({f.file for f in findings})} of {len(paths)} file(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"planner: {len(paths)} flow(s) ok" + ("" if db else " (no database: static checks and SQL syntax; "
                                                          "--db also prepares each statement on a server)"), err=True)


def _validate_targets(args: list[str], flows: Path | None) -> list[Path]:
    if not args:
        folder = flows or Path(os.environ.get("PLANNER_FLOWS", "flows"))
        return _flows_in(folder)
    out = []
    for arg in args:
        if Path(arg).is_dir():
            out += _flows_in(Path(arg))
            continue
        folder, name = _resolve_flow(arg, flows)
        if arg.endswith((".yaml", ".yml")) or os.sep in arg:
            out.append(Path(arg))  # a path is checked as given, whatever its name (`x.yaml.bak`, /dev/zero)
        else:
            out.append(next(folder / f"{name}{s}" for s in (".yaml", ".yml") if (folder / f"{name}{s}").exists()))
    return out


def _flows_in(folder: Path) -> list[Path]:
    """Every flow file (`*.yaml`, `*.yml`) of a folder, sorted; a usage error when there is none."""
    paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not paths:
        raise UsageError(f"no flows (*.yaml, *.yml) in {folder}/")
    return paths


@app.command("list")
def list_flows(
    as_json: Annotated[bool, typer.Option("--json", help="Print the flows as JSON.")] = False,
    flows: FlowsOpt = None,
) -> None:
    """List the flows of the folder and their inputs (name, type, default).

    Example: planner list --flows flows
    """
    from planner.api import load_flow

    folder = flows or Path(os.environ.get("PLANNER_FLOWS", "flows"))
    listed: dict[str, Any] = {}
    broken: list[str] = []
    for path in _flows_in(folder):
        try:
            flow = load_flow(path)
        except FlowError as exc:
            broken.append(_redact(str(exc)))
            listed[path.stem] = {"file": str(path), "error": _redact(str(exc))}
            continue
        listed[flow.name] = {
            "file": str(path),
            "description": flow.loaded.spec.description,
            "nodes": len(flow.nodes),
            "inputs": {name: {"type": spec.type, "required": spec.required, "default": spec.default,
                              "description": spec.description} for name, spec in flow.inputs.items()},
        }
    if as_json:
        from planner.results import jsonable

        typer.echo(json.dumps(jsonable(listed), indent=2))
    else:
        rows = []
        for name, info in listed.items():
            if "error" in info:
                rows.append([name, "(does not load: see below)", "", ""])
                continue
            inputs = info["inputs"] or {"-": None}
            for i, (input_name, spec) in enumerate(inputs.items()):
                kind, default = ("", "") if spec is None else (spec["type"], "(required)" if spec["required"] else json.dumps(spec["default"]))
                rows.append([name if i == 0 else "", input_name, kind, default])
        print_table(f"{len(listed)} flow(s) in {folder}/", ["flow", "input", "type", "default"], rows)
    for line in broken:
        typer.echo(f"planner: {line}", err=True)
    if broken:
        raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the flow format, for editors (yaml-language-server).

    Example: planner schema > flow.schema.json
    """
    from planner.lang.schema import flow_schema

    typer.echo(json.dumps(flow_schema(), indent=2))


@app.command()
def demo(
    runs: Annotated[int, typer.Option("--runs", min=1, max=10_000, help="Runs per mode and flow.")] = 30,
    rtt: Annotated[float, typer.Option("--rtt", min=0, max=1000, help="Network round trip (ms) added by a local proxy; 0 for the bare local database.")] = 20.0,
    db: DbOpt = None,
) -> None:
    """Run both seed flows on the demo database and compare the three modes.

    Starts (or reuses) the embedded PostgreSQL, loads the demo schema and data if missing,
    prints each flow's plan and a table of measured latency per mode. The queries cross a
    local proxy that adds a 20 ms round trip, the network the seed's backend had.

    Example: planner demo --rtt 0   (the bare local database)
    """
    from planner.demo.run import DEMO_DATABASE, load_notes, load_table, main_sync

    server = db or os.environ.get("DATABASE_URL")
    if server is None:
        from planner.db.embedded import embedded_dsn

        server = embedded_dsn()  # started (or reused) first: the output says which database before any figure
    typer.echo(f"database: {_shown_dsn(_on_database(server, DEMO_DATABASE))}")
    if db is None:
        typer.echo(f"  (open it with: planner db psql --database {DEMO_DATABASE})")
    typer.echo("")
    figures = main_sync(server, runs, rtt)
    for name, info in figures["flows"].items():
        p = info["plan"]
        typer.echo(f"== {name} ==")
        group_text = "; ".join(", ".join(g) for g in p.groups)
        typer.echo(f"groups: {group_text}")
        typer.echo(f"critical path: {' -> '.join(p.critical_path)}")
        typer.echo(f"estimate from latency hints: sequential {p.sequential_ms:g} ms, parallel {p.parallel_ms:g} ms "
                   f"({(1 - p.parallel_ms / p.sequential_ms) * 100:.0f}% lower)")
        base = next(f for f in info["figures"] if f.mode == "sequential").p50
        rows = [[f.mode, f"{f.p50:.2f}", f"{f.p95:.2f}", f"{f.p50 / base:.2f}", f"{f.queries_per_run:.1f}"] for f in info["figures"]]
        network = f"{rtt:g} ms round trip added by a local proxy" if rtt else "local database, no network delay"
        print_table(f"measured over {runs} runs per mode ({network})",
                    ["mode", "p50 ms", "p95 ms", "x sequential", "queries/run"], rows, right={1, 2, 3, 4})
        typer.echo("")
    if figures["load"]:
        title, headers, rows, right = load_table(figures["load"], rtt)
        print_table(title, headers, rows, right=right)
        for line in load_notes(figures["load"]):
            typer.echo(line)
        typer.echo("")
    if db is None and not os.environ.get("DATABASE_URL"):
        _embedded_left_running()


def _embedded_left_running() -> None:
    """Say that the embedded server the demo used is still running, and how to stop it: a
    process that outlives the command it came from should never be a surprise."""
    from planner.db.embedded import embedded_status

    status = embedded_status()
    if status.running:
        typer.echo(f"The embedded PostgreSQL is still running (pid {status.pid}, data in {status.pgdata}), so that "
                   "the next demo or run starts at once; `planner db stop` stops it.")


# --- planner db -----------------------------------------------------------------------------

db_app = typer.Typer(
    name="db",
    help="The database planner uses: DATABASE_URL when set, else the embedded PostgreSQL.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(db_app)
DatabaseOpt = Annotated[str | None, typer.Option("--database", help="Another database of that server (e.g. planner_demo).")]


def _which_database() -> str:
    """The DSN planner uses without `--db`: DATABASE_URL, else the embedded server's (started
    if it is not running). Raises `DatabaseUnavailable` when there is none to use."""
    from planner.db.embedded import embedded_allowed, embedded_dsn

    env = os.environ.get("DATABASE_URL")
    if env:
        return env
    if not embedded_allowed():
        raise DatabaseUnavailable("no database configured: DATABASE_URL is not set and PLANNER_EMBEDDED="
                                  f"{os.environ.get('PLANNER_EMBEDDED', '')} forbids the embedded server")
    try:
        return embedded_dsn()
    except Exception as exc:  # pg_ctl, a missing wheel, a data folder it cannot write
        raise DatabaseUnavailable(f"cannot start the embedded PostgreSQL: {error_text(exc)}") from exc


def _for_libpq(dsn: str) -> tuple[str, str | None]:
    """`dsn` without planner's own `?pgbouncer=` parameter, which libpq (psql) refuses, and
    that parameter's value (None when it had none)."""
    from planner.db.pooler import split_pooler

    return split_pooler(dsn)


@db_app.command("url")
def db_url(
    database: DatabaseOpt = None,
    show_password: Annotated[bool, typer.Option(
        "--show-password", help="Print the password too (hidden as *** otherwise), for psql \"$(planner db url --show-password)\".")] = False,
) -> None:
    """Print the DSN planner uses: DATABASE_URL's, else the embedded server's (started if it is
    not running), for psql or any libpq client: planner's own `?pgbouncer=` parameter is left
    out (libpq refuses it), and stderr says so. A password is shown as `***` (a terminal is
    often shared or recorded) unless `--show-password`; stderr says when one was hidden.

    Example: planner db url --database planner_demo --show-password   (then: psql "$(planner db url --show-password)")
    """
    dsn = _which_database()
    dsn, pooler = _for_libpq(_on_database(dsn, database) if database else dsn)
    shown = _shown_dsn(dsn, password=show_password)
    typer.echo(shown)
    if shown != _shown_dsn(dsn, password=True):  # stderr: `$(planner db url)` stays the DSN alone
        typer.echo("(password hidden as ***: --show-password prints it, e.g. psql \"$(planner db url --show-password)\"; "
                   "planner db psql needs neither)", err=True)
    if pooler is not None:
        # stderr: `$(planner db url)` stays the DSN alone
        typer.echo(f"(?pgbouncer={pooler} left out: it is planner's, libpq clients refuse it; "
                   "keep it in the DSN planner is given)", err=True)


@db_app.command("status")
def db_status() -> None:
    """Which database planner uses and whether it is up; the embedded server's data folder,
    state and version. Exits 0 when the database planner would use is up, 1 when it is not.

    Example: planner db status
    """
    from planner.db.admin import server_version
    from planner.db.embedded import embedded_allowed, embedded_status

    env = os.environ.get("DATABASE_URL")
    status = embedded_status()
    rows: list[tuple[str, str]] = []
    if env:
        try:
            reachable, up = f"yes ({asyncio.run(server_version(env))})", True
        except DatabaseUnavailable as exc:
            reachable, up = f"no: {_one_line(_redact(str(exc)))}", False
        rows += [("database", "DATABASE_URL (the embedded server is not used)"), ("url", _shown_dsn(env)),
                 ("reachable", reachable)]
    elif not embedded_allowed():
        up = False
        rows.append(("database", "none: DATABASE_URL is not set and PLANNER_EMBEDDED forbids the embedded server"))
    else:
        up = status.running
        rows.append(("database", "the embedded PostgreSQL (DATABASE_URL is not set)"))
    state = (f"running (pid {status.pid})" if status.running else
             "stopped" if status.initialized else "not created yet (planner creates it when it first needs it)")
    rows += [("embedded", state), ("data folder", str(status.pgdata)), ("version", status.version or "unknown")]
    if status.dsn is not None:
        rows.append(("embedded url", _shown_dsn(status.dsn)))
    width = max(len(key) for key, _ in rows) + 1
    for key, value in rows:
        typer.echo(f"{key + ':':<{width}} {value}")
    if not up:
        raise typer.Exit(1)


@db_app.command("psql", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def db_psql(ctx: typer.Context, database: DatabaseOpt = None) -> None:
    """Open psql on the database planner uses (DATABASE_URL, else the embedded server, started
    if needed; planner's `?pgbouncer=` left out, psql refuses it). Other arguments are psql's
    own. Uses the psql on PATH, else the embedded server's own.

    Example: planner db psql --database planner_demo -c 'SELECT count(*) FROM whatsapp_instances'
    """
    psql = find_psql()
    if psql is None:
        raise UsageError("psql is not installed (not on PATH, and the embedded server has none); "
                         "connect with any client to the DSN of: planner db url")
    dsn = _which_database()
    dsn, password = _without_password(_for_libpq(_on_database(dsn, database) if database else dsn)[0])
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password  # not on the command line, where `ps` would show it
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(psql, [psql, dsn, *ctx.args], env)


def find_psql() -> str | None:
    """The psql on PATH, else the one that comes with the embedded server; None when neither."""
    import shutil

    from planner.db.embedded import embedded_psql

    found = shutil.which("psql")
    if found:
        return found
    own = embedded_psql()
    return None if own is None else str(own)


def _without_password(dsn: str) -> tuple[str, str | None]:
    """A URL DSN without its password, and the password (None when it has none)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    if "://" not in dsn:
        return dsn, None
    parts = urlsplit(dsn)
    user, at, host = parts.netloc.rpartition("@")
    name, colon, password = user.partition(":")
    if not at or not colon:
        return dsn, None
    return urlunsplit(parts._replace(netloc=f"{name}@{host}")), unquote(password) or None


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (planner starts it again when it next needs it).

    Example: planner db stop
    """
    from planner.db.embedded import embedded_status, stop_embedded

    pgdata = embedded_status().pgdata
    try:
        stopped = stop_embedded()
    except Exception as exc:  # pg_ctl refused: say why, on one line
        raise DatabaseUnavailable(f"cannot stop the embedded PostgreSQL in {pgdata}: {error_text(exc)}") from exc
    typer.echo(f"stopped the embedded PostgreSQL in {pgdata}" if stopped else
               f"the embedded PostgreSQL in {pgdata} is not running")


# --- planner init -----------------------------------------------------------------------------

EXAMPLE_FLOW = """\
# yaml-language-server: $schema=flow.schema.json
description: >
  An example flow. `clock` and `server` need nothing from each other, so they run together;
  `message` uses both, so it waits for them. Nobody wrote that order down: it comes from the
  references ($clock.db, $server). `planner plan example` shows the groups.
inputs:
  name: str
  greeting: {type: str, default: Hello}
nodes:
  clock:
    sql: SELECT now() AS at, current_database() AS db
    fetch: one
    latency: 5ms
  server:
    sql: SHOW server_version
    fetch: value
    latency: 5ms
  message:
    sql: SELECT format('%s, %s! (%s, PostgreSQL %s)', $greeting::text, $name::text, $clock.db::text, $server::text)
    fetch: value
    on_error: fail           # no message, no answer: the run fails rather than default
    latency: 5ms
output:
  message: $message
  at: $clock.at
"""

EXAMPLE_TEST = '''\
"""The flows of this project, run on a fresh database with the project's schema.

`planner_flow_db` comes with planner (its pytest plugin, docs/testing.md): a `Planner` over the
flows folder (`planner_flows` in pytest.ini) on a database of its own for each test, made from
`planner_schema`'s SQL, on DATABASE_URL's server, else on an embedded PostgreSQL started for
the session. `planner_flow_dsn` is that database's DSN, to insert rows before a run.
"""


async def test_example_greets(planner_flow_db) -> None:
    result = await planner_flow_db.run("example", {{"name": "world"}})
    assert not result.degraded, result.defaulted  # a node that fell back on its default fails the test
    assert result.output["message"].startswith("Hello, world!")
'''

EXAMPLE_PYTEST_INI = """\
# planner's pytest fixtures (docs/testing.md): pytest-asyncio runs them.
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
# The SQL that makes the tests' database: files, or folders of *.sql (in name order),
# relative to this file; several separated by spaces or lines.
planner_schema = db/schema.sql
planner_flows = {flows}
"""

EXAMPLE_SCHEMA = """\
-- The tables your flows read and write. Applied once per test session to a template
-- database, which each test then copies (planner_schema in pytest.ini).
CREATE TABLE greetings (
    id       bigserial PRIMARY KEY,
    name     text NOT NULL,
    said_at  timestamptz NOT NULL DEFAULT now()
);
"""

EXAMPLE_CI = """\
# Checks every flow on each push: YAML, schema, references, cycles, call targets and SQL
# syntax (no database needed), then runs the flows' tests on an embedded PostgreSQL.
name: flows
on: [push, pull_request]
jobs:
  flows:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with: {{python-version: "3.12"}}
      - run: pip install planner-flows pytest pytest-asyncio
      - run: planner validate {flows} --format github
      - run: pytest
"""


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="The project folder (default: the current one).")] = Path("."),
    flows_name: Annotated[str, typer.Option("--flows-dir", help="The flows folder, inside the project folder.")] = "flows",
) -> None:
    """Start a project: a flows folder with an example flow (and the schema editors read), a
    test using planner's pytest fixtures with their pytest.ini and the project's db/schema.sql
    (as docs/testing.md shows them), and a CI workflow running `planner validate` and pytest.
    Never overwrites a file: if any of them exists, nothing is written.

    Example: planner init . && planner validate flows
    """
    from planner.lang.schema import flow_schema

    files = {
        Path(flows_name) / "example.yaml": EXAMPLE_FLOW,
        Path(flows_name) / "flow.schema.json": json.dumps(flow_schema(), indent=2) + "\n",
        Path("tests") / "test_flows.py": EXAMPLE_TEST.format(flows=flows_name),
        Path("pytest.ini"): EXAMPLE_PYTEST_INI.format(flows=flows_name),
        Path("db") / "schema.sql": EXAMPLE_SCHEMA,
        Path(".github") / "workflows" / "flows.yml": EXAMPLE_CI.format(flows=flows_name),
    }
    existing = [str(directory / rel) for rel in files if (directory / rel).exists() or (directory / rel).is_symlink()]
    if existing:
        raise UsageError(f"would overwrite {', '.join(existing)}; nothing written (move them away, or init another folder)")
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x") as handle:  # "x": never replace a file that appeared meanwhile
            handle.write(text)
        typer.echo(f"created {path}")
    flows_dir = directory / flows_name
    typer.echo(f"\nnext: planner validate {flows_dir}\n      planner run example --flows {flows_dir} -i name=you")


def main() -> None:
    """Entry point: run the app, turning every error into one line and an exit code."""
    try:
        code = app(standalone_mode=False)  # returns the code of a `typer.Exit` raised inside
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("aborted", 2)
    except UsageError as exc:
        _fail(str(exc), 2)
    except (FlowInputError, DatabaseUnavailable) as exc:
        _fail(str(exc), 2)
    except FlowFileError as exc:
        _fail(str(exc), 1)
    except FlowError as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # click's own usage errors (exit 2), and the database's
        code = getattr(exc, "exit_code", None)
        if hasattr(exc, "format_message") and isinstance(code, int):
            _fail(exc.format_message(), code)
        if os.environ.get("PLANNER_DEBUG"):
            sys.stderr.write(_redact("".join(traceback.format_exception(exc))))
            sys.exit(2)
        _fail(_environment_message(exc), 2)


def _environment_message(exc: BaseException) -> str:
    if isinstance(exc, (OSError, ConnectionError)) or type(exc).__module__.startswith("asyncpg") or _raised_in_asyncpg(exc):
        return f"cannot reach the database: {error_text(exc)}"
    return f"internal error: {error_text(exc)} (PLANNER_DEBUG=1 shows the traceback)"


def _raised_in_asyncpg(exc: BaseException) -> bool:
    """asyncpg reports a malformed DSN (a port that is not a number) with plain `ValueError`s:
    where it was raised says it is the database's address that is wrong, not planner."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("asyncpg.")


if __name__ == "__main__":  # pragma: no cover
    main()
