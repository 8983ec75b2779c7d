"""The `planner` command line: thin commands over the library.

Exit codes follow sqlfluff and dbt: 0 ok, 1 findings or a failed run, 2 usage, environment or
internal error. Data goes to stdout, diagnostics to stderr; Rich is used only on a terminal
(and honours NO_COLOR). No command ever shows a traceback (set PLANNER_DEBUG=1 to see one).
No password of a DSN is ever printed: every message goes through `planner.db.dsn.redact_text`.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from planner.cli import flows, scaffold, server  # noqa: F401  (each registers its commands on `app`)
from planner.cli.common import UsageError, _fail, _redact, app, print_table
from planner.cli.server import _embedded_left_running, find_psql
from planner.errors import DatabaseUnavailable, FlowError, FlowFileError, FlowInputError
from planner.results import error_text
from planner.settings import SettingsError

__all__ = ["UsageError", "_embedded_left_running", "_fail", "app", "find_psql", "main", "print_table"]


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
    except (FlowInputError, DatabaseUnavailable, SettingsError) as exc:
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
