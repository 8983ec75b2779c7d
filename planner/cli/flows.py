"""The commands on flows: run, plan, explain, visualize, validate, list, schema."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from planner.cli.common import (
    ERROR_CELL,
    DbOpt,
    FlowsOpt,
    UsageError,
    _parse_inputs,
    _planner,
    _redact,
    _resolve_flow,
    _shown_dsn,
    app,
    print_table,
)
from planner.errors import (
    FlowDatabaseLost,
    FlowError,
    FlowFailed,
)
from planner.results import error_text
from planner.views.render import plain

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
    from planner.compile import compiled_trips, plan_groups
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
    groups = plan_groups(compiled) if compile_enabled_now() else ()
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
        cached = frozenset(n.name for n in group.nodes if n.sql.cache_ttl is not None)
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
    from planner.settings import Settings

    return Settings.from_env().compile


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
    from planner.settings import Settings

    report = asyncio.run(validate_report(paths, db, Settings.from_env()))
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
