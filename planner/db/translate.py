"""asyncpg's and the socket's errors become planner's here, and nowhere else (as httpx maps
httpcore's in one place): `QueryError` (with `sqlstate`, `transient`, `position`) and
`DatabaseUnavailable`, with every parameter value a message may show redacted."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import asyncpg

from planner.errors import QueryError
from planner.lang.refs import CompiledSql, name_params
from planner.results import error_text

logger = logging.getLogger("planner")

# Class 08 (connection exceptions) and these: serialization failure, deadlock, too many
# connections, admin/crash shutdown, cannot connect now.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "53300", "57P01", "57P02", "57P03"})


def translate(exc: BaseException, statement: CompiledSql | None = None, params: Sequence[Any] | None = None) -> BaseException:
    """asyncpg's and the socket's errors -> planner's; anything else is returned unchanged.

    Parameter values never reach the message (see `redact`): asyncpg quotes a value it could
    not encode, the server quotes an input it could not parse, and an integrity error shows
    the key or the row it refused; all of these are hidden.
    """
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None)
        transient = isinstance(sqlstate, str) and (sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"))
        message = redact(error_text(exc), sqlstate, params)
        if statement is not None:
            message = name_params(message, statement)
        if sqlstate in POOLER_SQLSTATES and "__asyncpg_" in message:
            message = _pooler_hint(message)
        position = getattr(exc, "position", None)
        return QueryError(message, sqlstate=sqlstate, transient=transient,
                          position=int(position) if isinstance(position, str) and position.isdigit() else None)
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.exceptions.ProtocolError)):
        message = redact(error_text(exc), None, params)
        if statement is not None:
            message = name_params(message, statement)
        return QueryError(message, transient=isinstance(exc, asyncpg.ConnectionDoesNotExistError))
    if isinstance(exc, TimeoutError):  # an OSError too; asyncpg's own carry no message
        return QueryError(f"the database did not answer in time ({error_text(exc)})", transient=True)
    if isinstance(exc, (ConnectionError, OSError)):
        return QueryError(f"connection lost: {error_text(exc)}", transient=True)
    return exc


POOLER_SQLSTATES = ("26000", "42P05")
"""A prepared statement of asyncpg's that does not exist, or already exists, on the server
connection: what a transaction-mode pooler does to a client that keeps prepared statements."""
POOLER_HINT = ("a transaction-mode pooler (PgBouncer's pool_mode = transaction) is between planner and the "
               "server, and planner was not told: add ?pgbouncer=transaction to the DSN (&pgbouncer=transaction "
               "when it has a query already), or pass Planner(pool_options=PoolOptions(pooler='transaction')), or set "
               "PLANNER_POOLER=transaction")
_pooler_told = False


def _pooler_hint(message: str) -> str:
    """The error of a pooler planner was not told of: what to add to the DSN first, then the
    server's words without asyncpg's advice (which suggests settings planner makes itself).
    Logged at ERROR once per process: every statement would otherwise say it again."""
    global _pooler_told
    said = message.split("\nHINT:", 1)[0].strip()
    if not _pooler_told:
        _pooler_told = True
        logger.error("planner: %s (the server said: %s)", POOLER_HINT, said, extra={"outcome": "pooler_not_told"})
    return f"{POOLER_HINT}. The server said: {said}"


def redact(message: str, sqlstate: str | None, params: Sequence[Any] | None) -> str:
    """`message` with every parameter value it may show replaced by `…` (or by its type).

    - asyncpg's `invalid input for query argument $1: 'sk_live_..' (...)`: the value's type only;
    - data exceptions (class 22) quote the input they could not parse: every quoted text;
    - integrity violations (class 23) show `Key (k)=(value)` and `Failing row contains (...)`;
    - any other message that quotes (or shows) a text parameter, whatever its case:
      `relation "sk_live_.." does not exist` for `$x::regclass`.
    """
    message = _redact_argument(message, params)
    if isinstance(sqlstate, str) and sqlstate.startswith("22"):
        message = _redact_literals(message)
    if isinstance(sqlstate, str) and sqlstate.startswith("23"):
        message = _KEY.sub(r"\1=(…)", message)
        message = _ROW.sub(r"\1(…)", message)
    return _redact_values(message, params)


_ARGUMENT = re.compile(r"(invalid input for query argument \$(\d+)):.*", re.DOTALL)
_LITERAL = re.compile(r"\"(?:[^\"]|\"\")*\"|'(?:[^']|'')*'")
_KEY = re.compile(r"([Kk]ey \((?:[^()]|\([^()]*\))*\))=\(.*?\)(?= already exists| is not present| conflicts with|\.?$)",
                  re.MULTILINE)
_ROW = re.compile(r"(Failing row contains )\(.*\)", re.MULTILINE)
_SHOWN_MIN = 6  # a text parameter this long is hidden wherever it appears; shorter ones only when quoted


def _redact_argument(message: str, params: Sequence[Any] | None) -> str:
    """`invalid input for query argument $1: 'sk_live_..' (...)` -> the value's type only."""

    def replace(match: re.Match[str]) -> str:
        index = int(match.group(2)) - 1
        kind = type(params[index]).__name__ if params is not None and 0 <= index < len(params) else "value"
        return f"{match.group(1)}: a {kind} value that does not fit the parameter's type (value not shown)"

    return _ARGUMENT.sub(replace, message)


def _redact_literals(message: str) -> str:
    """`invalid input syntax for type integer: "abc"` -> `...: "…"` (data errors quote the input)."""
    return _LITERAL.sub(lambda m: m.group(0)[0] + "…" + m.group(0)[0], message)


def _texts(value: Any) -> list[str]:
    """The texts inside a parameter value (lists and dicts walked)."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _texts(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _texts(item)]
    return []


def _redact_values(message: str, params: Sequence[Any] | None) -> str:
    texts = sorted({t.casefold() for t in _texts(list(params or ()))}, key=len, reverse=True)
    if not texts:
        return message

    def quoted(match: re.Match[str]) -> str:
        text = match.group(0)
        inner = text[1:-1].casefold()
        if inner and any(t in inner or (len(inner) >= 4 and inner in t) for t in texts):
            return text[0] + "…" + text[0]
        return text

    message = _LITERAL.sub(quoted, message)
    for text in texts:
        if len(text) >= _SHOWN_MIN:
            message = re.sub(re.escape(text), "…", message, flags=re.IGNORECASE)
    return message


def _reraise(exc: BaseException, statement: CompiledSql | None = None, params: Sequence[Any] | None = None) -> NoReturn:
    mapped = translate(exc, statement, params)
    if mapped is exc:
        raise exc
    if _shows_values(exc, params):
        # The driver's error (and what caused it) quotes a value: a traceback of the chain,
        # in a log, would show what the message hides.
        raise mapped from None
    raise mapped from exc


def _shows_values(exc: BaseException, params: Sequence[Any] | None) -> bool:
    chain: BaseException | None = exc
    while chain is not None:
        raw = str(chain)
        if redact(raw, getattr(chain, "sqlstate", None), params) != raw:
            return True
        chain = chain.__cause__
    return False
