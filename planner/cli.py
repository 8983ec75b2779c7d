"""The `planner` command line: thin commands over the library.

Exit codes follow sqlfluff and dbt: 0 ok, 1 findings or a failed run, 2 usage, environment or
internal error. Data goes to stdout, diagnostics to stderr; Rich is used only on a terminal
(and honours NO_COLOR). No command ever shows a traceback (set PLANNER_DEBUG=1 to see one).
No password of a DSN is ever printed: every message goes through `planner.dsn.redact_text`.
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

from planner.dsn import dsn_secrets, redact_text
from planner.errors import DatabaseUnavailable, FlowError, FlowFailed, FlowFileError, FlowInputError
from planner.render import plain

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


def _resolve_flow(flow: str, flows: Path | None) -> tuple[Path, str]:
    """A flow given by name (looked up in the flows folder) or by path."""
    if flow.endswith((".yaml", ".yml")) or os.sep in flow:
        path = Path(flow)
        if not path.exists():
            raise UsageError(f"no such flow file: {flow}")
        return path.parent, path.stem
    folder = flows or Path(os.environ.get("PLANNER_FLOWS", "flows"))
    if not any((folder / f"{flow}{s}").exists() for s in (".yaml", ".yml")):
        raise UsageError(f"no flow named {flow!r} in {folder}/ (give a name from --flows or a path to a .yaml file)")
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
            raise UsageError(f"-i {key}: flow {name!r} has no input {key!r} (inputs: {', '.join(flow.inputs) or 'none'})")
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
    flows: FlowsOpt = None,
    db: DbOpt = None,
) -> None:
    """Run a flow once and show each node's outcome.

    Example: planner run process_buffered -i instance_name=acme -i user_phone=+15550000001 -i message=hi
    """
    folder, name = _resolve_flow(flow, flows)

    async def go() -> tuple[Any, Any, int, Any]:
        async with _planner(folder, db) as planner:
            values = _parse_inputs(planner, name, inputs or [], inputs_file)
            try:
                result = await planner.run(name, values, mode=mode)
                code = 0
            except FlowFailed as exc:
                result, code = exc.result, 1
            return planner.load(name), result, code, planner.cache_stats()

    compiled, result, code, cache = asyncio.run(go())
    from planner import stats

    try:
        stats.record(result)
    except OSError as exc:  # statistics are a convenience: never fail a run over them
        typer.echo(f"planner: could not record latencies: {exc}", err=True)
    if trace is not None:
        from planner.trace import write_trace

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
    if code:
        typer.echo(f"planner: flow {name!r} {result.status}", err=True)
        raise typer.Exit(code)


def _run_table(compiled: Any, result: Any) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """`planner run`'s rows, in the plan's group order, one line each; and, for each error the
    table could not show whole (asyncpg's DETAIL and HINT lines, a long message), the error."""
    rows, details = [], []
    for name in (n for group in compiled.groups for n in group if n in result.nodes):
        node = result.nodes[name]
        error = "" if node.error is None else _redact(f"{type(node.error).__name__}: {node.error}")
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
    from planner.graph import plan as make_plan
    from planner.graph import trips
    from planner.render import estimate, ms_number, plan_json, plan_rows
    from planner.stats import recorded_latencies

    folder, name = _resolve_flow(flow, flows)
    compiled = _planner(folder, None).load(name)
    recorded = recorded_latencies(name)
    p = make_plan(compiled, recorded)
    est = estimate(compiled, p, recorded)
    cold, warm = trips(compiled), trips(compiled, warm=True)
    if as_json:
        data = plan_json(compiled, p, recorded=recorded)
        data["round_trips"] = {"statements": cold.statements, "critical": cold.critical,
                               "statements_cache_warm": warm.statements, "critical_cache_warm": warm.critical,
                               "fused": [list(g) for g in cold.fused_groups]}
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
    if est.unknown:
        typer.echo(f"no latency hint or record for: {', '.join(est.unknown)} (counted as 0)", err=True)


def _trips_line(cold: Any, warm: Any) -> str:
    """`statements per run: 6 (5 with the cache warm); round trips on the critical path: 4 (3)...`"""
    line = f"statements per run: at most {cold.statements}"
    if (warm.statements, warm.critical) != (cold.statements, cold.critical):
        line += f" ({warm.statements} with the cache warm)"
    line += f"; round trips on the critical path: {cold.critical}"
    if warm.critical != cold.critical:
        line += f" ({warm.critical} with the cache warm)"
    if cold.fused_groups:
        line += "; fused: " + ", ".join("+".join(g) for g in cold.fused_groups)
    return line


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
    from planner import render
    from planner.graph import plan as make_plan
    from planner.stats import recorded_latencies

    if fmt not in ("mermaid", "dot", "svg", "html"):
        raise UsageError(f"--format {fmt!r}: choose mermaid, dot, svg or html")
    folder, name = _resolve_flow(flow, flows)
    compiled = _planner(folder, None).load(name)
    recorded = recorded_latencies(name)  # as `planner plan` does: records first, then hints
    p = make_plan(compiled, recorded)
    run_data = None
    if trace is not None:
        from planner.trace import TraceError, read_trace

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
            from planner import draw

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
    flow_args: Annotated[list[str] | None, typer.Argument(metavar="[FLOW]...", help="Flows (names or paths); default: every flow of --flows.")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Also prepare every statement on this database.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json or github.")] = "text",
    flows: FlowsOpt = None,
) -> None:
    """Check flows: YAML, schema, references, cycles, call targets; with --db, against the real schema.

    Example: planner validate --db postgresql://localhost/app
    """
    from planner.validate import render_findings, validate_paths

    if fmt not in ("text", "json", "github"):
        raise UsageError(f"--format {fmt!r}: choose text, json or github")
    paths = _validate_targets(flow_args or [], flows)
    findings = asyncio.run(validate_paths(paths, db))
    out = render_findings(findings, fmt, checked=len(paths))
    if out:
        typer.echo(out)
    if findings:
        typer.echo(f"planner: {len(findings)} problem(s) in {len({f.file for f in findings})} of {len(paths)} file(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"planner: {len(paths)} flow(s) ok", err=True)


def _validate_targets(args: list[str], flows: Path | None) -> list[Path]:
    if not args:
        folder = flows or Path(os.environ.get("PLANNER_FLOWS", "flows"))
        paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
        if not paths:
            raise UsageError(f"no flows in {folder}/")
        return paths
    out = []
    for arg in args:
        folder, name = _resolve_flow(arg, flows)
        if arg.endswith((".yaml", ".yml")) or os.sep in arg:
            out.append(Path(arg))  # a path is checked as given, whatever its name (`x.yaml.bak`, /dev/zero)
        else:
            out.append(next(folder / f"{name}{s}" for s in (".yaml", ".yml") if (folder / f"{name}{s}").exists()))
    return out


@app.command()
def schema() -> None:
    """Print the JSON Schema of the flow format, for editors (yaml-language-server).

    Example: planner schema > flow.schema.json
    """
    from planner.schema import flow_schema

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
    from planner.demo.run import main_sync

    figures = main_sync(db or os.environ.get("DATABASE_URL"), runs, rtt)
    typer.echo(f"database: {_redact(figures['database'])}\n")
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
        return f"cannot reach the database: {type(exc).__name__}: {exc}"
    return f"internal error: {type(exc).__name__}: {exc} (PLANNER_DEBUG=1 shows the traceback)"


def _raised_in_asyncpg(exc: BaseException) -> bool:
    """asyncpg reports a malformed DSN (a port that is not a number) with plain `ValueError`s:
    where it was raised says it is the database's address that is wrong, not planner."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("asyncpg.")


if __name__ == "__main__":  # pragma: no cover
    main()
