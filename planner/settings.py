"""The process's settings, read from the environment once, at the edge, and passed down.

`Settings.from_env()` reads every `PLANNER_*` and `DATABASE_*` variable planner knows, checks
each (a bad value is a `SettingsError`, a `ValueError`, naming the variable), and returns a frozen `Settings`. A
`Planner` made without `settings=` and `run_flow`'s default planner use it; nothing below the
facade reads the environment (tests/test_layers.py checks it), so a variable set later takes
effect for planners made after it is set (a restart of a service). `Settings()` is the
environment ignored (httpx's `trust_env=False`): every default, whatever the process says.

>>> Settings.from_env({"PLANNER_MODE": "sequential", "PLANNER_CACHE": "0"}).mode
'sequential'
>>> Settings.from_env({"PLANNER_CACHE": "maybe"})
Traceback (most recent call last):
...
planner.settings.SettingsError: PLANNER_CACHE='maybe': expected 1, true, on or yes (on) or 0, false, off or no (off)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from planner.db.dsn import pooler_mode
from planner.db.replica import DEFAULT_MAX_LAG, parse_max_lag
from planner.lang.models import OnError
from planner.run.executor import MODES, Mode


class SettingsError(ValueError):
    """A variable of the environment planner cannot use; the message names it."""


_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


@dataclass(frozen=True)
class Settings:
    """What the environment configures, one field per variable (named in each comment)."""

    flows: Path = Path("flows")  # PLANNER_FLOWS: the flows folder of a Planner given none
    mode: Mode | None = None  # PLANNER_MODE: beats every other mode (the rollback switch: sequential)
    on_error: OnError = "default"  # PLANNER_ON_ERROR: what a failure does to a node whose flow says nothing
    allowed_modules: tuple[str, ...] | None = None  # PLANNER_ALLOWED_MODULES (comma separated)
    coalesce: bool = True  # PLANNER_COALESCE
    fuse: bool = True  # PLANNER_FUSE
    cache: bool = True  # PLANNER_CACHE
    compile: bool = True  # PLANNER_COMPILE
    metrics: bool = True  # PLANNER_METRICS
    embedded: bool = True  # PLANNER_EMBEDDED: may the embedded PostgreSQL be started when no server is named
    pooler: str | None = None  # PLANNER_POOLER: "transaction" or None (below pooler= and a DSN's ?pgbouncer=)
    database_url: str | None = None  # DATABASE_URL: the server of a Planner given no dsn=, pool= or backend=
    replica_dsn: str | None = None  # DATABASE_REPLICA_URL
    replica_max_lag: float = DEFAULT_MAX_LAG  # PLANNER_REPLICA_MAX_LAG, in seconds

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings `environ` (the process's environment by default) gives. An unset or
        empty variable keeps its default. Raises `SettingsError` naming the first bad variable."""

        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        def switch(name: str, default: bool) -> bool:
            value = get(name)
            if value is None:
                return default
            if value.lower() in _ON:
                return True
            if value.lower() in _OFF:
                return False
            raise SettingsError(f"{name}={value!r}: expected {', '.join(_ON[:-1])} or {_ON[-1]} (on) "
                             f"or {', '.join(_OFF[:-1])} or {_OFF[-1]} (off)")

        mode = get("PLANNER_MODE")
        if mode is not None and mode not in MODES:
            raise SettingsError(f"PLANNER_MODE={mode!r}: choose eager, layered or sequential")
        on_error = (get("PLANNER_ON_ERROR") or "default").lower()
        if on_error not in ("default", "fail"):
            raise SettingsError(f"PLANNER_ON_ERROR={get('PLANNER_ON_ERROR')!r}: choose default or fail")
        allowed = environ.get("PLANNER_ALLOWED_MODULES")  # set but empty: nothing may be called
        max_lag = get("PLANNER_REPLICA_MAX_LAG")
        try:
            lag = parse_max_lag(max_lag) if max_lag is not None else DEFAULT_MAX_LAG
        except ValueError as exc:
            raise SettingsError(f"PLANNER_REPLICA_MAX_LAG={max_lag!r}: {exc}") from None
        try:
            pooler = pooler_mode(get("PLANNER_POOLER"), "PLANNER_POOLER")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return cls(
            flows=Path(get("PLANNER_FLOWS") or "flows"),
            mode=next((m for m in MODES if m == mode), None),
            on_error="fail" if on_error == "fail" else "default",
            allowed_modules=None if allowed is None else tuple(m.strip() for m in allowed.split(",") if m.strip()),
            coalesce=switch("PLANNER_COALESCE", True),
            fuse=switch("PLANNER_FUSE", True),
            cache=switch("PLANNER_CACHE", True),
            compile=switch("PLANNER_COMPILE", True),
            metrics=switch("PLANNER_METRICS", True),
            embedded=switch("PLANNER_EMBEDDED", True),
            pooler=pooler,
            database_url=get("DATABASE_URL"),
            replica_dsn=get("DATABASE_REPLICA_URL"),
            replica_max_lag=lag,
        )
