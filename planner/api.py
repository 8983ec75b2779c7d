"""The facade: `Planner` (flows + database backend) and the process-wide `run_flow`.

It composes the one-way pipeline: file -> `load_spec` -> `compile_flow` -> bind -> `execute`.
The flow versions it serves (cached by file stamp, hot reload) are `planner.flows`'s; the
database stack is `planner.db.stack`'s; the environment is read once (`planner.settings`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import weakref
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from planner.compile import plan_groups
from planner.config import CallTargets, FlowSource
from planner.db.cache import CacheStats
from planner.db.replica import ReplicaBackend
from planner.db.stack import CacheOptions, PoolOptions, ReplicaOptions, build_stack
from planner.errors import DatabaseUnavailable, FlowError, FlowInputError
from planner.flows import FlowVersion, FlowVersions
from planner.graph import CompiledFlow, Plan, compile_flow, plan
from planner.kinds import BindEnv, BoundNode, kind_of
from planner.kinds.backend import Backend
from planner.kinds.call import DEFAULT_THREADS, MAX_AUTO_THREADS, CallOptions, CallThreads, sync_calls_at_once
from planner.lang.loader import FileStamp, load_spec, load_text
from planner.lang.models import OnError
from planner.results import FlowResult
from planner.run.compiled import GroupRunner
from planner.run.executor import bind_inputs, execute_checked, resolve_mode
from planner.run.metrics import Metrics, default_metrics, watch_planner
from planner.run.observers import RunObserver, default_observers
from planner.settings import Settings

logger = logging.getLogger("planner")

NodeRun = Callable[[Any], Coroutine[Any, Any, Any]]
NodeWrapper = Callable[[str, str, NodeRun], NodeRun]
"""`wrapper(flow, node, run) -> run`: wraps each node's execution (tests inject faults with it;
instrumentation can time it). It sees the node's resolved arguments and returns its value."""

class Planner:
    """Runs flows against one database backend.

    >>> async with Planner(flows="flows", dsn="postgresql://localhost/app") as planner:  # doctest: +SKIP
    ...     result = await planner.run("escalation", {"instance_id": 1, "user_phone": "+1555", "message": "hi"})

    `flows`: the flows folder (else `PLANNER_FLOWS`, else `./flows`). `dsn=` gives planner a pool
    of its own (closed with the planner); `pool=` borrows yours (never closed here); neither:
    `DATABASE_URL`, else the embedded PostgreSQL (which database, and why, is logged once at
    WARNING). Nothing is opened until a flow with SQL to run runs. The stack over the pool
    (`planner.db.stack`: effects, cache, replica router, fusion, coalescing) is built by
    `build_stack`; `backend=` takes any `planner.kinds.backend.Backend` instead, used as given
    under the cache. `replica_dsn` adds a read replica (`planner.db.replica`; `""`: none).
    `mode` is the runs' mode unless `run(mode=)` or `PLANNER_MODE` says otherwise.

    Options come in groups, each a frozen dataclass documented where it is defined:
    `pool_options=PoolOptions(min_size, max_size, full_reset, pooler, embedded)`,
    `cache_options=CacheOptions(size, channel)`, `replica_options=ReplicaOptions(dsn, max_lag)`,
    `call_options=CallOptions(threads, wait, concurrency, allowed_modules)`.

    `node_wrapper` wraps every node's execution (`NodeWrapper`); `observers` watch every run
    (`planner.run.observers.RunObserver`). `metrics` (`planner.run.metrics`): by default the
    process-wide registry (`planner.metrics_text()`), or the `Metrics` given; `False` (or
    `PLANNER_METRICS=0`) records nothing. `on_error` ("default" or "fail"; else
    `PLANNER_ON_ERROR`) is what a failure does to a node whose flow says nothing. `settings`:
    the environment's values (`planner.Settings`), read once here when not given.
    """

    def __init__(
        self,
        flows: str | Path | None = None,
        *,
        dsn: str | None = None,
        pool: Any = None,
        backend: Backend | None = None,
        mode: str | None = None,
        replica_dsn: str | None = None,
        pool_options: PoolOptions | None = None,
        cache_options: CacheOptions | None = None,
        replica_options: ReplicaOptions | None = None,
        call_options: CallOptions | None = None,
        node_wrapper: NodeWrapper | None = None,
        observers: Sequence[RunObserver] | None = None,
        metrics: Metrics | bool | None = None,
        on_error: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        # The environment is read here, once (`Settings.from_env`), unless settings are given.
        self.settings = settings = settings if settings is not None else Settings.from_env()
        self.on_error = resolve_on_error(on_error, settings.on_error)
        self.source = FlowSource(Path(flows) if flows is not None else settings.flows)
        self.mode = mode
        pools, calls = pool_options or PoolOptions(), call_options or CallOptions()
        # The database stack, built in one place (`planner.db.stack`): its parts by name.
        self.stack = build_stack(dsn=dsn, pool=pool, backend=backend, pool_options=pools,
                                 cache_options=cache_options or CacheOptions(),
                                 replica_options=_replica(replica_dsn, replica_options, settings),
                                 **_from_settings(settings))
        self.replica: ReplicaBackend | None = self.stack.replica
        self.pools: dict[str, Any] = self.stack.pools  # planner's own PoolBackends by role (primary, replica): metrics read them
        self.cache = self.stack.cache
        self.effects = self.stack.effects
        self.backend: Backend = self.stack.backend
        allowed = calls.allowed_modules if calls.allowed_modules is not None else settings.allowed_modules
        self.targets = CallTargets(allowed, folder=self.source.folder)
        self.threads = CallThreads(calls.threads if calls.threads is not None else DEFAULT_THREADS, wait_s=calls.wait)
        self._threads_given = calls.threads is not None
        self._concurrency = calls.concurrency if calls.concurrency is not None else pools.max_size
        self.node_wrapper = node_wrapper
        self.observers = observers
        # Metrics are on by default (a defaulted node must show somewhere): the process-wide
        # registry unless another is given, none with metrics=False or PLANNER_METRICS=0.
        wanted = settings.metrics if metrics is None else metrics
        chosen = default_metrics() if wanted is True else wanted or None
        self.metrics: Metrics | None = chosen
        if chosen is not None:
            watch_planner(chosen, self)
        self._env = BindEnv(self.targets, self.backend, self.threads, self.stack.database)
        self._threads_warned: set[tuple[str, int]] = set()
        self.versions = FlowVersions(self.source, self._env, self._bind)  # the flow cache, hot reload
        self._db_open = False
        self._closed = False
        self._effects_checked: weakref.WeakSet[CompiledFlow] = weakref.WeakSet()  # `cache:` judged by the catalog

    @property
    def flows_dir(self) -> Path:
        return self.source.folder

    @property
    def allowed(self) -> list[str]:
        return self.targets.allowed

    @property
    def reload_errors(self) -> dict[str, FlowError]:
        """Why the last edit of a flow did not load, by flow (its last good version still runs)."""
        return self.versions.reload_errors

    async def __aenter__(self) -> Planner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def invalidate(self, node: str | None = None, *, flow: str | None = None) -> int:
        """Drop values kept by `cache:` nodes: all when no node is named; else node `node`'s in
        every flow, or only in `flow` (or every node of `flow`). Returns how many were dropped.
        Other processes on the cache channel drop theirs; in each, the next read of what was
        named comes from the primary until the read replica is proven past this moment."""
        return self.cache.invalidate(node, flow=flow)

    def cache_stats(self) -> CacheStats:
        """Hits, misses, size and invalidations of this planner's cache."""
        return self.cache.stats()

    async def close(self) -> None:
        """Finish background work and close the pool if this planner owns it."""
        self._closed = True
        if self.metrics is not None:
            self.metrics.unwatch(self)  # a closed planner's pools and cache are no longer read
        await self.backend.close()

    def path_of(self, name: str) -> Path:
        """The file of flow `name` (`<flows>/<name>.yaml` or `.yml`). Raises `FlowFileError`."""
        return self.source.path_of(name)

    def load(self, name: str) -> CompiledFlow:
        """The compiled flow `name`, from the cache unless its file changed."""
        return self.versions.load(name).flow

    def plan(self, name: str, recorded_ms: dict[str, float] | None = None) -> Plan:
        """Groups, critical path and latency estimate of flow `name`."""
        return plan(self.load(name), recorded_ms)

    async def run(
        self,
        flow: str | CompiledFlow,
        inputs: dict[str, Any] | None = None,
        *,
        mode: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> FlowResult:
        """Run a flow once: by name (a file of the flows folder) or a `CompiledFlow` from `load_flow`.

        Raises `FlowInputError` for bad inputs, `FlowFailed` (with `.result`) when an
        `on_error: fail` node fails or the deadline passes, `FlowFileError` for a broken flow,
        `DatabaseUnavailable` when the flow has SQL to run and the database cannot be reached.
        """
        if self._closed:
            raise FlowError("this Planner is closed")
        entry = await self.versions.entry(flow, on_server=self._db_open) if isinstance(flow, str) \
            else self.versions.of(flow)
        try:
            values = bind_inputs(entry.flow, inputs or {})
            chosen = resolve_mode(entry.flow, self.settings.mode or mode or self.mode)
            if not self._db_open and entry.needs_db and _runs_sql(entry, overrides):
                await self.backend.open()  # raises DatabaseUnavailable before any node runs
                self._db_open = True
        except (FlowInputError, DatabaseUnavailable) as exc:
            if self.metrics is not None:
                self.metrics.refused(entry.flow.name, "invalid_input" if isinstance(exc, FlowInputError) else "unavailable")
            raise
        if self._db_open and entry.flow not in self._effects_checked:
            await self._check_effects(entry)
        observers = self.observers if self.observers is not None else default_observers()
        return await execute_checked(entry.flow, entry.bound, values, chosen, overrides, observers, self.on_error,
                                     self.metrics)

    async def _check_effects(self, entry: FlowVersion) -> None:
        """Before a flow's first run on this planner, ask the server's catalog about each of its
        single statements at once (so that its runs find every verdict known and its sibling
        reads still start together), and refuse a flow that caches a statement the catalog does
        not prove pure (a volatile function, a view over one, a row lock...): a `FlowFileError`
        `PLN131` at the `cache:` line, naming the function."""
        nodes = [(name, node) for name, node in entry.flow.nodes.items() if len(node.sql.statements) == 1]
        verdicts = await asyncio.gather(*(self.effects.effects(node) for _, node in nodes))
        for (name, node), effects in zip(nodes, verdicts, strict=True):
            if node.sql.cache_ttl is not None and not effects.pure and effects.resolved:
                raise entry.flow.marks.error(
                    f"cache: a statement with effects is never cached: it {effects.why()}",
                    ("nodes", name, "cache"), code="PLN131")
        self._effects_checked.add(entry.flow)

    def _bind(self, flow: CompiledFlow, stamp: FileStamp) -> FlowVersion:
        bound: dict[str, BoundNode] = {}
        plain = {name: kind_of(spec.kind).bind(spec, flow.marks, self._env) for name, spec in flow.nodes.items()}
        runners: list[GroupRunner] = []
        serving: dict[str, GroupRunner] = {}
        # A node_wrapper may fail, retry or replace a node (fault injection, circuit breakers) after
        # the compiled statement already ran its write: each node must run as its own statement.
        if self.settings.compile and self.node_wrapper is None:
            for group in plan_groups(flow):
                runner = GroupRunner(group, flow, self.backend, self.cache, {n: plain[n].args for n in group.names},
                                     load=self.stack.primary_pool,
                                     judge=self.effects.effects if self.stack.catalog is not None else None)
                runners.append(runner)
                serving.update(dict.fromkeys(group.names, runner))
        for name, spec in flow.nodes.items():
            node = plain[name]
            if name in serving:  # a member is bound to its group: its kind still wraps the value
                env = dataclasses.replace(self._env, backend=serving[name].backend_for(name))
                node = kind_of(spec.kind).bind(spec, flow.marks, env)
            if self.node_wrapper is not None:
                node = dataclasses.replace(node, run=self.node_wrapper(flow.name, name, node.run))
            if spec.invalidates:  # outermost: only a node that ends ok drops the values
                node = dataclasses.replace(node, run=self.cache.invalidating(flow.name, spec.invalidates, node.run))
            bound[name] = node
        needs_db = any(kind_of(spec.kind).needs_database(spec) for spec in flow.nodes.values())
        self._size_threads(flow)
        return FlowVersion(stamp, flow, bound, needs_db, tuple(runners))

    def _size_threads(self, flow: CompiledFlow) -> None:
        """Make room for `flow`'s sync calls: grow the threads when planner chose their number,
        else warn (once per flow and need) when the number given is smaller than the need."""
        per_run = sync_calls_at_once(flow.groups, flow.nodes, self.targets)
        needed = per_run * self._concurrency
        if needed <= self.threads.size:
            return
        if not self._threads_given and needed <= MAX_AUTO_THREADS:
            logger.info("flow %s: %d sync call(s) at once x %d runs in flight: %d threads for sync calls",
                        flow.name, per_run, self._concurrency, needed, extra={"flow": flow.name})
            self.threads.size = needed
            return
        if (flow.name, needed) in self._threads_warned:
            return
        self._threads_warned.add((flow.name, needed))
        given = f"CallOptions(threads={self.threads.size})" if self._threads_given else f"at most {MAX_AUTO_THREADS}"
        logger.warning(
            "flow %s: up to %d sync call(s) at once x %d runs in flight (CallOptions.concurrency) may need %d threads, and "
            "there are %s: under that load sync calls wait for a thread (up to their timeout, else %gs) and then "
            "fail (CallThreadsBusy). Raise CallOptions.threads, make the functions async def, or lower the concurrency",
            flow.name, per_run, self._concurrency, needed, given, self.threads.wait_s,
            extra={"flow": flow.name, "call_threads": self.threads.size, "call_threads_needed": needed})


def _from_settings(settings: Settings) -> dict[str, Any]:
    """What the environment says about the database stack, for `build_stack`."""
    return {"coalesce": settings.coalesce, "fuse": settings.fuse, "cache": settings.cache,
            "database_url": settings.database_url, "embedded_default": settings.embedded,
            "default_pooler": settings.pooler}


def _replica(dsn: str | None, options: ReplicaOptions | None, settings: Settings) -> ReplicaOptions:
    """`replica_dsn=` or `replica_options=` (not both with a DSN), the environment's below them."""
    if dsn is not None and options is not None and options.dsn is not None:
        raise TypeError("give the replica's DSN once: replica_dsn= or replica_options=ReplicaOptions(dsn=...)")
    options = options or ReplicaOptions()
    chosen = dsn if dsn is not None else options.dsn if options.dsn is not None else settings.replica_dsn
    lag = options.max_lag if options.max_lag is not None else settings.replica_max_lag
    return ReplicaOptions(dsn=chosen or None, max_lag=lag)


def resolve_on_error(given: str | None, default: OnError = "default") -> OnError:
    """`on_error=`, else `default` (the settings' `PLANNER_ON_ERROR`). Raises `ValueError` for another value."""
    if given is None:
        return default
    chosen = given.strip().lower()
    if chosen == "default":
        return "default"
    if chosen == "fail":
        return "fail"
    raise ValueError(f"on_error= {given!r}: choose default or fail")


def _runs_sql(entry: FlowVersion, overrides: dict[str, Any] | None) -> bool:
    """Whether a run may send SQL: a flow whose SQL nodes are all overridden opens no pool."""
    if not overrides:
        return True
    return any(kind_of(spec.kind).needs_database(spec) and name not in overrides
               for name, spec in entry.flow.nodes.items())


def load_flow(path: str | os.PathLike[str] | None = None, *, text: str | None = None, name: str = "flow") -> CompiledFlow:
    """Load, validate and compile one flow: a file, or YAML `text` (no database; `call:`
    targets are not imported until a `Planner` runs it).

    >>> flow = load_flow("flows/escalation.yaml")
    >>> flow.groups
    (('settings', 'interactions'), ('decide',), ('record',))
    >>> load_flow(text="nodes: {a: {sql: SELECT 1, fetch: value}}", name="one").name
    'one'

    Raises `FlowFileError` (file, line and node in the message) or `FlowGraphError`.
    """
    if (path is None) == (text is None):
        raise TypeError("load_flow() takes a path or text=, not both")
    if text is not None:
        return compile_flow(load_text(text, name=name, file=f"<{name}>"))
    assert path is not None
    return compile_flow(load_spec(path))


def load_flows(folder: str | os.PathLike[str]) -> dict[str, CompiledFlow]:
    """Every `*.yaml` / `*.yml` flow of a folder, by name. Raises on the first broken file."""
    return {path.stem: load_flow(path) for path in FlowSource(Path(folder)).paths()}


def metrics_text() -> str:
    """The process-wide metrics (`planner.run.metrics.default_metrics`) in Prometheus' text format;
    empty when `PLANNER_METRICS=0` (read at each call: this is the edge a `/metrics` route calls).

    A FastAPI route: `return Response(planner.metrics_text(), media_type=planner.run.metrics.CONTENT_TYPE)`.
    """
    return default_metrics().text() if Settings.from_env().metrics else ""


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
