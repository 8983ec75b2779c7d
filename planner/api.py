"""The facade: `Planner` (flows folder + database) and the process-wide `run_flow`.

It composes the one-way pipeline: file -> `load_spec` -> `compile_flow` -> bind -> `execute`.
Compiled flows are cached by file stamp; an edited file is recompiled on the next run, and an
edit that no longer loads leaves the last good version running (the error is logged and kept
in `Planner.reload_errors`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from planner.db import Database
from planner.errors import FlowError, FlowFileError, FlowInputError
from planner.executor import BoundNode, bind_inputs, execute_checked, resolve_mode
from planner.graph import CompiledFlow, Plan, compile_flow, plan
from planner.loader import load_spec
from planner.models import NAME_RE
from planner.results import FlowResult
from planner.runners import bind_flow

logger = logging.getLogger("planner")

DEFAULT_ALLOWED = ("planner.demo",)

NodeRun = Callable[[Any], Coroutine[Any, Any, Any]]
NodeWrapper = Callable[[str, str, NodeRun], NodeRun]
"""`wrapper(flow, node, run) -> run`: wraps each node's execution (tests inject faults with it;
instrumentation can time it). It sees the node's resolved arguments and returns its value."""


@dataclass(frozen=True)
class _Entry:
    stamp: tuple[int, int]
    flow: CompiledFlow
    bound: dict[str, BoundNode]
    needs_db: bool


class Planner:
    """Runs the flows of one folder against one database.

    >>> async with Planner(flows="flows", dsn="postgresql://localhost/app") as planner:  # doctest: +SKIP
    ...     result = await planner.run("escalation", {"instance_name": "acme", "user_phone": "+1555"})

    `dsn=` gives planner a pool of its own (closed with the planner); `pool=` borrows yours
    (never closed here). With neither, `DATABASE_URL` is used, else the embedded PostgreSQL;
    the pool is opened before the first flow with SQL runs, so flows of Python calls need no
    database. `min_size`/`max_size` size an owned pool; `full_reset=True` keeps asyncpg's reset
    query on release (see `planner.db.Database` for why it is skipped by default).
    `allowed_modules` (default: `PLANNER_ALLOWED_MODULES`, else `planner.demo` and the Python
    modules in the flows folder) limits what `call:` nodes may call. `node_wrapper` wraps
    every node's execution (see `NodeWrapper`).
    """

    def __init__(
        self,
        flows: str | Path | None = None,
        *,
        dsn: str | None = None,
        pool: asyncpg.Pool | None = None,
        mode: str | None = None,
        allowed_modules: list[str] | None = None,
        min_size: int = 2,
        max_size: int = 10,
        full_reset: bool = False,
        node_wrapper: NodeWrapper | None = None,
    ) -> None:
        self.flows_dir = Path(flows if flows is not None else os.environ.get("PLANNER_FLOWS", "flows"))
        self.mode = mode
        self.db = Database(dsn=dsn, pool=pool, min_size=min_size, max_size=max_size, full_reset=full_reset)
        self.allowed = allowed_modules if allowed_modules is not None else default_allowed_modules(self.flows_dir)
        self.node_wrapper = node_wrapper
        self.reload_errors: dict[str, FlowError] = {}
        self._cache: dict[str, _Entry] = {}
        self._closed = False

    async def __aenter__(self) -> Planner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Finish background work and close the pool if this planner owns it."""
        self._closed = True
        await self.db.close()

    def path_of(self, name: str) -> Path:
        """The file of flow `name` (`<flows>/<name>.yaml` or `.yml`). Raises `FlowFileError`."""
        if not NAME_RE.fullmatch(name):
            raise FlowInputError(f"{name!r} is not a flow name")
        for suffix in (".yaml", ".yml"):
            path = self.flows_dir / f"{name}{suffix}"
            if path.exists():
                return path
        raise FlowFileError(f"no flow named {name!r} in {self.flows_dir}/", file=self.flows_dir / f"{name}.yaml")

    def load(self, name: str) -> CompiledFlow:
        """The compiled flow `name`, from the cache unless its file changed."""
        return self._entry(name).flow

    def plan(self, name: str, recorded_ms: dict[str, float] | None = None) -> Plan:
        """Groups, critical path and latency estimate of flow `name`."""
        return plan(self.load(name), recorded_ms)

    async def run(
        self,
        name: str,
        inputs: dict[str, Any] | None = None,
        *,
        mode: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> FlowResult:
        """Run flow `name` once.

        Raises `FlowInputError` for bad inputs, `FlowFailed` (with `.result`) when an
        `on_error: fail` node fails or the deadline passes, `FlowFileError` for a broken flow.
        """
        if self._closed:
            raise FlowError("this Planner is closed")
        entry = self._entry(name)
        values = bind_inputs(entry.flow, inputs or {})
        chosen = resolve_mode(entry.flow, mode or self.mode)
        if entry.needs_db and not self.db.opened:
            await self.db.pool()  # raises DatabaseUnavailable before any node runs
        return await execute_checked(entry.flow, entry.bound, values, chosen, overrides)

    def _entry(self, name: str) -> _Entry:
        entry = self._cache.get(name)
        # One stat per run for a cached flow; the folder is searched only when it is not.
        path = entry.flow.loaded.path if entry is not None else self.path_of(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            path = self.path_of(name)  # renamed (.yaml <-> .yml) or gone: search again
            st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if entry is not None and entry.stamp == stamp:
            return entry
        try:
            flow = compile_flow(load_spec(path))
            bound = bind_flow(flow, allowed=self.allowed, pool=self.db.pool, sql=self.db.bind_sql)
            if self.node_wrapper is not None:
                wrap = self.node_wrapper
                bound = {n: BoundNode(b.spec, b.args, wrap(flow.name, b.spec.name, b.run)) for n, b in bound.items()}
        except FlowError as exc:
            if entry is None:
                raise
            if self.reload_errors.get(name) is None or str(self.reload_errors[name]) != str(exc):
                logger.error("flow %s: edit does not load, still running the last good version: %s", name, exc,
                             extra={"flow": name})
            self.reload_errors[name] = exc
            return entry
        self.reload_errors.pop(name, None)
        entry = _Entry(stamp, flow, bound, any(node.kind == "sql" for node in flow.nodes.values()))
        self._cache[name] = entry
        return entry


def default_allowed_modules(flows_dir: Path) -> list[str]:
    """`PLANNER_ALLOWED_MODULES` when set; else `planner.demo` and the modules in `flows_dir`."""
    configured = os.environ.get("PLANNER_ALLOWED_MODULES")
    if configured is not None:
        return [m.strip() for m in configured.split(",") if m.strip()]
    local = _modules_in(flows_dir)
    if local and str(flows_dir.resolve()) not in sys.path:
        sys.path.append(str(flows_dir.resolve()))  # appended: it can never shadow an installed module
    return [*DEFAULT_ALLOWED, *local]


def _modules_in(folder: Path) -> list[str]:
    """Python modules in `folder`, except any whose name is taken by the standard library or an
    installed package: a file `flows/os.py` must not make `os:popen` callable."""
    if not folder.is_dir():
        return []
    names = [p.stem for p in folder.glob("*.py") if NAME_RE.match(p.stem)]
    names += [p.parent.name for p in folder.glob("*/__init__.py") if NAME_RE.match(p.parent.name)]
    return sorted(n for n in set(names) if n not in sys.stdlib_module_names and not _installed_elsewhere(n, folder))


def _installed_elsewhere(name: str, folder: Path) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    origin = spec.origin if spec is not None else None
    return origin is not None and not Path(origin).resolve().is_relative_to(folder.resolve())


def load_flow(path: str | os.PathLike[str]) -> CompiledFlow:
    """Load, validate and compile one flow file (no database; `call:` targets are not imported).

    >>> flow = load_flow("flows/escalation.yaml")
    >>> flow.groups
    (('settings', 'interactions'), ('decide',), ('record',))

    Raises `FlowFileError` (file, line and node in the message) or `FlowGraphError`.
    """
    return compile_flow(load_spec(path))


def load_flows(folder: str | os.PathLike[str]) -> dict[str, CompiledFlow]:
    """Every `*.yaml` / `*.yml` flow of a folder, by name. Raises on the first broken file."""
    paths = sorted([*Path(folder).glob("*.yaml"), *Path(folder).glob("*.yml")])
    return {path.stem: load_flow(path) for path in paths}


_default: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Planner] = weakref.WeakKeyDictionary()


async def run_flow(
    name: str, inputs: dict[str, Any] | None = None, *, mode: str | None = None, overrides: dict[str, Any] | None = None
) -> FlowResult:
    """Run flow `name` with the process-wide default `Planner`.

    That planner reads flows from `PLANNER_FLOWS` (default `./flows`) and uses `DATABASE_URL`,
    or the embedded PostgreSQL when it is unset. One is kept per event loop, because an
    asyncpg pool belongs to the loop that made it.

    >>> result = await run_flow("process_buffered", {"instance_name": "acme", ...})  # doctest: +SKIP
    >>> result.output["stored"]  # doctest: +SKIP
    """
    loop = asyncio.get_running_loop()
    planner = _default.get(loop)
    if planner is None:
        planner = _default[loop] = Planner()
    return await planner.run(name, inputs, mode=mode, overrides=overrides)
