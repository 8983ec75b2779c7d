"""What every command shares: the Typer app, its options, printing (tables, one-line
failures, DSNs without passwords), finding a flow and parsing its inputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from planner.db.dsn import dsn_secrets, redact_text
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
