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
from planner.db.cache import DEFAULT_SIZE, CacheStats
from planner.db.replica import ReplicaBackend
from planner.db.stack import CACHE_CHANNEL, build_stack
from planner.errors import DatabaseUnavailable, FlowError, FlowInputError
from planner.flows import FlowVersion, FlowVersions
from planner.graph import CompiledFlow, Plan, compile_flow, plan
from planner.kinds import BindEnv, BoundNode, kind_of
from planner.kinds.backend import Backend
from planner.kinds.call import DEFAULT_THREADS, MAX_AUTO_THREADS, WAIT_S, CallThreads, sync_calls_at_once
from planner.lang.loader import FileStamp, load_spec, load_text
from planner.lang.models import OnError
from planner.results import FlowResult
from planner.run.compiled import GroupRunner
from planner.run.executor import bind_inputs, execute_checked, resolve_mode
from planner.run.metrics import Labels, Metrics, Sample, default_metrics
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

    `dsn=` gives planner a pool of its own (closed with the planner); `pool=` borrows yours
    (never closed here). Either way the backend is
    `CacheBackend(FusingBackend(CoalescingBackend(PoolBackend(...))))` (with a replica, a
    `ReplicaBackend` under the cache routes each read to one of two such stacks): sibling reads of one run that are
    ready together share one statement (`planner.db.fuse`), and reads of concurrent runs that
    would wait for a connection share one (`planner.db.coalesce`). `backend=` takes any
    `planner.kinds.backend.Backend` instead, used as given. With none, `DATABASE_URL` is used, else the embedded
    PostgreSQL; nothing is opened until a flow with SQL to run runs. `min_size`/`max_size`
    size an owned pool; `full_reset=True` keeps asyncpg's reset query on release.
    `allowed_modules` (default: `PLANNER_ALLOWED_MODULES`, else the demo's flow functions and
    the Python modules in the flows folder) limits what `call:` nodes may call.
    `call_threads` bounds the threads that run sync calls; a sync call that finds them all busy
    waits in line within its node's timeout (else `call_wait` seconds) and then fails with
    `CallThreadsBusy` (counted, logged). When not given, planner sizes the threads for each
    flow it binds: `concurrency` (the runs a service has in flight at once; default: `max_size`)
    times the most sync calls of one plan group, at least 32, at most 512; when given and smaller
    than that, it warns once per flow. `node_wrapper` wraps every node's execution (see
    `NodeWrapper`); `observers` watch every run (see `planner.run.observers.RunObserver`).
    `metrics` records runs, node outcomes, latencies, pools, cache and sync-call threads (see
    `planner.run.metrics`): by default into the process-wide registry (`planner.metrics_text()`),
    or into the `Metrics` given; `metrics=False` (or `PLANNER_METRICS=0`) records nothing.
    `cache_size` bounds the values `cache:` nodes keep (see `planner.db.cache`; `PLANNER_CACHE=0`
    turns the cache off). Invalidations reach the other processes on the same database through
    LISTEN/NOTIFY on `cache_channel` (None: this process only); while a process cannot listen,
    its cache is not used (its values may have gone stale without it knowing).
    `embedded=False` (or `PLANNER_EMBEDDED=0`) forbids the embedded fallback: with no `dsn=`,
    `pool=` or `DATABASE_URL`, a run raises `DatabaseUnavailable`. Which database is used, and
    why, is logged once at WARNING on the `planner` logger.
    `replica_dsn` (default: `DATABASE_REPLICA_URL`; `""` for none) adds a read replica, with a
    pool and a stack of its own: reads a replica may answer go to it while it is up and lags
    less than `replica_max_lag` (a duration, default `PLANNER_REPLICA_MAX_LAG`, else 10s),
    everything else to the primary (see `planner.db.replica`; `Planner.replica` is that backend).
    It applies to planner's own stack: with `backend=`, wrap yours in `ReplicaBackend` instead.
    `pooler="transaction"` (or `?pgbouncer=transaction` in the DSN, or
    `PLANNER_POOLER=transaction`) runs behind PgBouncer's transaction mode (docs/flows.md); the
    cache then stays in its process (LISTEN cannot pass such a pooler).
    `on_error` (default: `PLANNER_ON_ERROR`, else "default") is what a failure does to a node
    whose flow says nothing: "fail" makes every such failure fail the run; a node's own
    `on_error` and its flow's `settings.on_error` win over it.
    """

    def __init__(
        self,
        flows: str | Path | None = None,
        *,
        dsn: str | None = None,
        pool: Any = None,
        backend: Backend | None = None,
        mode: str | None = None,
        allowed_modules: list[str] | None = None,
        min_size: int = 2,
        max_size: int = 10,
        full_reset: bool = False,
        node_wrapper: NodeWrapper | None = None,
        observers: Sequence[RunObserver] | None = None,
        call_threads: int | None = None,
        call_wait: float = WAIT_S,
        concurrency: int | None = None,
        cache_channel: str | None = CACHE_CHANNEL,
        cache_size: int = DEFAULT_SIZE,
        embedded: bool | None = None,
        replica_dsn: str | None = None,
        replica_max_lag: str | float | None = None,
        pooler: str | None = None,
        metrics: Metrics | bool | None = None,
        on_error: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        # The environment is read here, once (`Settings.from_env`), unless settings are given.
        self.settings = settings = settings if settings is not None else Settings.from_env()
        self.on_error = resolve_on_error(on_error, settings.on_error)
        self.source = FlowSource(Path(flows) if flows is not None else settings.flows)
        self.mode = mode
        # The database stack, built in one place (`planner.db.stack`): its parts by name.
        self.stack = build_stack(
            dsn=dsn, pool=pool, backend=backend, min_size=min_size, max_size=max_size, full_reset=full_reset,
            embedded=embedded, pooler=pooler, cache_size=cache_size, cache_channel=cache_channel,
            replica_dsn=replica_dsn if replica_dsn is not None else settings.replica_dsn,
            replica_max_lag=replica_max_lag if replica_max_lag is not None else settings.replica_max_lag,
            **_from_settings(settings))
        self.replica: ReplicaBackend | None = self.stack.replica
        self.pools: dict[str, Any] = self.stack.pools  # planner's own PoolBackends by role (primary, replica): metrics read them
        self.cache = self.stack.cache
        self.effects = self.stack.effects
        self.backend: Backend = self.stack.backend
        self.targets = CallTargets(allowed_modules if allowed_modules is not None else settings.allowed_modules,
                                   folder=self.source.folder)
        self.threads = CallThreads(call_threads if call_threads is not None else DEFAULT_THREADS, wait_s=call_wait)
        self._threads_given = call_threads is not None
        self._concurrency = concurrency if concurrency is not None else max_size
        self.node_wrapper = node_wrapper
        self.observers = observers
        # Metrics are on by default (a defaulted node must show somewhere): the process-wide
        # registry unless another is given, none with metrics=False or PLANNER_METRICS=0.
        if metrics is None:
            metrics = settings.metrics
        chosen = default_metrics() if metrics is True else metrics or None
        self.metrics: Metrics | None = chosen
        if chosen is not None:
            chosen.watch(self, _samples)
            for role, pool in self.pools.items():
                pool.on_wait = _timer(chosen, "planner_pool_wait_seconds", (("pool", role),))
            self.threads.on_wait = _timer(chosen, "planner_call_wait_seconds", ())
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
                                     load=self.stack.primary_pool)
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
        given = "call_threads=" + str(self.threads.size) if self._threads_given else f"at most {MAX_AUTO_THREADS}"
        logger.warning(
            "flow %s: up to %d sync call(s) at once x %d runs in flight (concurrency=) may need %d threads, and "
            "there are %s: under that load sync calls wait for a thread (up to their timeout, else %gs) and then "
            "fail (CallThreadsBusy). Raise call_threads, make the functions async def, or lower the concurrency",
            flow.name, per_run, self._concurrency, needed, given, self.threads.wait_s,
            extra={"flow": flow.name, "call_threads": self.threads.size, "call_threads_needed": needed})


def _samples(planner: Planner) -> list[Sample]:
    """What `Metrics` reads of a planner when it collects: its pools, cache and sync-call threads."""
    out: list[Sample] = []
    for role, pool in planner.pools.items():
        where: Labels = (("pool", role),)
        out.append(("planner_pool_connections", (*where, ("state", "in_use")), pool.in_use))
        out.append(("planner_pool_connections", (*where, ("state", "max")), pool.max_size))
        out.append(("planner_pool_waiting", where, pool.waiting))
    stats = planner.cache.stats(expire=False)  # read from an exporter's thread too: change nothing
    out += [("planner_cache_hits_total", (), stats.hits), ("planner_cache_misses_total", (), stats.misses),
            ("planner_cache_invalidations_total", (), stats.invalidations), ("planner_cache_entries", (), stats.size)]
    threads = planner.threads
    out += [("planner_call_threads", (("state", "busy"),), threads.busy),
            ("planner_call_threads", (("state", "abandoned"),), threads.abandoned),
            ("planner_call_threads", (("state", "max"),), threads.size),
            # Calls waiting for a thread, where the threads queue them (a bounded line before them).
            ("planner_call_threads", (("state", "queued"),), threads.queued),
            ("planner_call_rejected_total", (), threads.rejected)]
    return out


def _from_settings(settings: Settings) -> dict[str, Any]:
    """What the environment says about the database stack, for `build_stack`."""
    return {"coalesce": settings.coalesce, "fuse": settings.fuse, "cache": settings.cache,
            "database_url": settings.database_url, "embedded_default": settings.embedded,
            "default_pooler": settings.pooler}


def _timer(metrics: Metrics, name: str, labels: Labels) -> Callable[[float], None]:
    def observe(seconds: float) -> None:
        metrics.observe(name, labels, seconds)

    return observe


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
