"""`call:` nodes: a Python function behind the allow-list, async or sync.

The allow-list is enforced at bind time, before anything runs (see `planner.config.CallTargets`).
Sync functions run on `CallThreads`, daemon threads of planner's own, never the event loop's
default executor: a sync call that times out cannot be stopped (Python cannot kill a thread),
so it keeps its thread until it returns; planner counts such threads. When every thread is
busy a call waits in line, within its node's timeout (else `WAIT_S`), and past that fails
loudly (`CallThreadsBusy`, counted and logged) rather than wait forever behind stuck calls.
The process is never kept alive for these threads at exit.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from planner.errors import CallThreadsBusy, DatabaseUnavailable, FlowFileError, NodeTimeout
from planner.kinds import BindEnv, BoundNode, Where
from planner.lang.models import CallNode, Settings
from planner.lang.nodes import CallBody
from planner.lang.refs import RefSyntaxError, compile_getter, parse_value

if TYPE_CHECKING:
    from planner.config import CallTargets
    from planner.kinds.backend import Database
    from planner.lang.nodes import CompiledNode
    from planner.lang.safeyaml import Marks

logger = logging.getLogger("planner")

DEFAULT_THREADS = 32
IDLE_S = 60.0  # an idle thread ends after this long
WAIT_S = 10.0  # how long a sync call of a node without a timeout may wait for a thread
QUEUE_PER_THREAD = 32  # calls that may wait for a thread at once, per thread...
QUEUE_MIN = 1024  # ...and at least this many: a burst of requests on a few threads is ordinary load
MAX_AUTO_THREADS = 512  # a Planner sizes its threads up to this many by itself (`sync_calls_at_once`)


@dataclass(frozen=True)
class CallOptions:
    """How a Planner runs `call:` nodes (`Planner(call_options=CallOptions(...))`).

    `allowed_modules` limits what they may call (None: `PLANNER_ALLOWED_MODULES`, else the
    demo's flow functions and the Python modules of the flows folder). `threads` bounds the
    threads that run sync calls; a sync call that finds them all busy waits in line within its
    node's timeout (else `wait` seconds) and then fails with `CallThreadsBusy` (counted,
    logged). None: planner sizes them for each flow it binds, `concurrency` (the runs a service
    has in flight at once; None: the pool's `max_size`) times the most sync calls of one plan
    group, at least 32, at most 512; a number given and smaller than that is warned of once
    per flow.
    """

    threads: int | None = None
    wait: float = WAIT_S
    concurrency: int | None = None
    allowed_modules: Sequence[str] | None = None


class CallKind:
    name: Literal["call"] = "call"
    refs_at = "with"
    shape: Literal["box", "round"] = "round"
    model = CallNode

    def compile(self, name: str, node: CallNode, marks: Marks, settings: Settings) -> CallBody:
        try:
            template = parse_value(node.with_)
        except RefSyntaxError as exc:
            raise marks.error(str(exc), ("nodes", name, "with")) from None
        return CallBody(target=node.call, args=template.value, refs=template.refs)

    def identity(self, node: CallNode) -> dict[str, Any]:
        return {"call": node.call, "with": node.with_}

    def written(self, name: str, node: CallNode) -> list[tuple[Where, str]]:
        return []  # a call sends no statement of its own (its `db` parameter is the function's)

    def bind(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> BoundNode:
        fn, wants_db = self._resolve(spec, marks, env)
        args = compile_getter(_body(spec).args)
        if inspect.iscoroutinefunction(fn):
            if not wants_db:
                # The common case, kept to one coroutine: the executor awaits the function's own.
                return BoundNode(spec, args, lambda kwargs: fn(**kwargs))
            database = env.database

            async def run_with_db(kwargs: dict[str, Any]) -> Any:
                kwargs["db"] = await _pool(database)
                return await fn(**kwargs)

            return BoundNode(spec, args, run_with_db)
        threads = env.threads or shared_threads()
        database = env.database

        timeout, where = spec.timeout, f"node {spec.name} of flow {spec.flow}"

        async def run_sync(kwargs: dict[str, Any]) -> Any:
            if wants_db:
                kwargs["db"] = await _pool(database)
            return await threads.run(fn, kwargs, node_timeout=timeout, where=where)

        # The node's timeout is applied by `CallThreads.run`: it bounds the wait for a thread
        # and the call together, and tells one from the other.
        return BoundNode(spec, args, run_sync, own_timeout=True)

    def needs_database(self, spec: CompiledNode) -> bool:
        return False  # a `db` parameter opens the pool when the function is called

    def uses_database(self, spec: CompiledNode, targets: CallTargets) -> bool:
        try:
            fn = targets.resolve(_body(spec).target)
        except ValueError:
            return False  # a run refuses it anyway, with the reason
        return "db" in inspect.signature(fn).parameters

    def check(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> list[FlowFileError]:
        try:  # exactly the checks a run makes: the allow-list, and `with:` against the signature
            self._resolve(spec, marks, env)
        except FlowFileError as exc:
            return [exc]
        return []

    def _resolve(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> tuple[Callable[..., Any], bool]:
        body = _body(spec)
        try:
            fn = env.targets.resolve(body.target)
        except ValueError as exc:
            raise marks.error(str(exc), ("nodes", spec.name, "call"), code="PLN300") from None
        signature = inspect.signature(fn)
        wants_db = "db" in signature.parameters
        try:
            signature.bind(**dict.fromkeys(body.args), **({"db": None} if wants_db else {}))
        except TypeError as exc:
            why, key = _misfit(signature, list(body.args), wants_db, str(exc))
            where = ("nodes", spec.name, "with") + ((key,) if key is not None else ())
            raise marks.error(f"with: does not fit {body.target}{signature}: {why}", where, code="PLN301") from None
        return fn, wants_db


def _body(spec: CompiledNode) -> CallBody:
    """The call body of `spec`, which the registry gave to this kind."""
    body = spec.body
    if not isinstance(body, CallBody):
        raise TypeError(f"node {spec.name} is a {spec.kind} node, not a call node")
    return body


async def _pool(database: Database | None) -> Any:
    """The pool a `db` parameter gets: the primary's (opened now if it was not)."""
    if database is None:
        raise DatabaseUnavailable("a call: node takes db, and this planner's backend has no database pool to give it")
    return await database.pool()


def _misfit(signature: inspect.Signature, given: list[str], wants_db: bool, fallback: str) -> tuple[str, str | None]:
    """Why `with:` keys do not bind to `signature`, naming the key (and the closest parameter for
    an unknown one), and the key to point at; Python's own words when it is something else."""
    import difflib

    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [] if takes_any else [key for key in given if key not in named]
    if unknown:
        free = [n for n in named if n not in given and n != "db"]
        close = difflib.get_close_matches(unknown[0], free or named, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (its parameters: {', '.join(named) or 'none'})"
        return f"unknown argument {unknown[0]!r}{hint}", unknown[0]
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
               and not (wants_db and n == "db")]
    if missing:
        return f"missing argument{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}", None
    return fallback, None


class CallThreads:
    """At most `size` daemon threads running sync `call:` functions, and a bounded queue before them.

    A call finds an idle thread, or starts one while fewer than `size` exist, or waits in line
    for one: as long as its node's timeout allows (else `wait_s`), and only while fewer than
    `max_queued` calls already wait. A call that gets no thread in that time never starts: it
    fails with `CallThreadsBusy`, which says how many threads are held by calls that timed out
    and how many calls wait; it is counted (`rejected`) and logged at WARNING. A call that
    started and then exceeds the node's timeout is abandoned (a thread cannot be stopped) and
    keeps its thread until it returns. A thread idle for `idle_s` ends, so that the threads of a
    Planner that is no longer used do not stay.

    Hooks for metrics (called on the event loop): `on_wait(seconds)` for each call that started,
    with how long it waited for a thread. Counters: `rejected` (never started), `waited` (had
    to wait in line); gauges: `busy`, `queued`, `abandoned`, `threads`.
    """

    def __init__(self, size: int = DEFAULT_THREADS, *, idle_s: float = IDLE_S, wait_s: float = WAIT_S,
                 max_queued: int | None = None) -> None:
        self.size = size
        self.idle_s = idle_s
        self.wait_s = wait_s
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._running = 0
        self._queued = 0
        self._abandoned = 0
        self._threads = 0
        self._work: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self.rejected = 0  # calls that never started: no thread within their wait, or the queue was full
        self.waited = 0  # calls that found every thread busy and waited in line
        self.on_wait: Callable[[float], None] | None = None  # told (on the loop) how long each call waited for a thread

    @property
    def max_queued(self) -> int:
        """How many calls may wait for a thread at once (default: `QUEUE_PER_THREAD` per thread, at
        least `QUEUE_MIN`). The wait is bounded in time too; this bounds what waiting holds."""
        if self._max_queued is not None:
            return self._max_queued
        return max(QUEUE_MIN, QUEUE_PER_THREAD * self.size)

    @property
    def busy(self) -> int:
        """Threads running a call now (those whose node timed out or was cancelled included)."""
        return self._running

    @property
    def queued(self) -> int:
        """Calls waiting for a thread now."""
        return self._queued

    @property
    def threads(self) -> int:
        """Threads started and not ended (busy or idle)."""
        return self._threads

    @property
    def abandoned(self) -> int:
        """Threads still running a call nobody waits for any more (it timed out or was cancelled)."""
        return self._abandoned

    async def run(self, fn: Callable[..., Any], kwargs: dict[str, Any], *, node_timeout: float | None = None,
                  where: str = "") -> Any:
        """`fn(**kwargs)` on a thread. `node_timeout` bounds the wait for a thread and the call together
        (then `CallThreadsBusy` if it never started, `NodeTimeout` if it did); without one, the
        wait alone is bounded by `wait_s`. `where` names the node in errors and logs."""
        loop = asyncio.get_running_loop()
        call = _Call(fn, kwargs, loop)
        with self._lock:
            full = self._running + self._queued >= self.size and self._queued >= self.max_queued
            if full:
                self.rejected += 1
            else:
                self._queued += 1
                # A thread (idle, or started below) takes it at once unless others are ahead of it.
                immediate = self._running + self._queued <= self.size
                if not immediate:
                    self.waited += 1
                start = self._threads < self.size and self._running + self._queued > self._threads
                if start:
                    self._threads += 1
                # Queued under the lock: an idle thread about to end sees it and stays.
                self._work.put(call)
        if full:
            raise self._refused(call, where, 0.0, full=True)
        if start:
            threading.Thread(target=self._serve, name=f"planner-call-{id(self):x}", daemon=True).start()
        timeout = node_timeout
        limit = self.wait_s if timeout is None else timeout
        try:
            if immediate and timeout is None:
                return await call.future  # the common case: nothing to bound
            done, _ = await asyncio.wait((call.future,), timeout=limit)
            if not done:
                with self._lock:
                    dropped = call.state == _QUEUED
                    if dropped:  # it never started, and now never will
                        call.state = _DROPPED
                        self._queued -= 1
                        self.rejected += 1
                if dropped:
                    call.future.cancel()
                    raise self._refused(call, where, limit, full=False)
                if timeout is not None:
                    remaining = call.asked + timeout - time.monotonic()
                    done, _ = await asyncio.wait((call.future,), timeout=max(remaining, 0.0))
                    if not done:
                        self._give_up(call)
                        raise NodeTimeout(f"timed out after {timeout * 1000:g} ms")  # as policy.timed says it
            return await call.future
        except asyncio.CancelledError:
            self._give_up(call)
            raise
        finally:
            if call.started and self.on_wait is not None:
                self.on_wait(call.started - call.asked)

    def _give_up(self, call: _Call) -> None:
        """Nobody waits for `call` any more: drop it if it has not started, else count its thread abandoned."""
        with self._lock:
            if call.state == _QUEUED:
                call.state = _DROPPED
                self._queued -= 1
            elif call.state == _RUNNING and not call.abandoned:
                call.abandoned = True
                self._abandoned += 1
        call.future.cancel()

    def _refused(self, call: _Call, where: str, waited_s: float, *, full: bool) -> CallThreadsBusy:
        stuck = f"{self._abandoned} of them still running calls that timed out: a thread cannot be stopped"
        if full:
            why = (f"all {self.size} threads for sync calls are busy ({stuck}) and {self._queued} calls already "
                   f"wait for one (at most {self.max_queued} may); not started")
        else:
            why = (f"all {self.size} threads for sync calls stayed busy for the {waited_s * 1000:g} ms this call "
                   f"could wait ({stuck}; {self._queued} calls still waiting); not started")
        logger.warning("%s%s: raise CallOptions.threads, make the function async def, or lower the load",
                       f"{where}: " if where else "", why,
                       extra={"call_threads": self.size, "call_queued": self._queued, "outcome": "call_rejected"})
        return CallThreadsBusy(why)

    def _serve(self) -> None:
        while True:
            try:
                call = self._work.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if not self._work.empty():
                        continue  # queued while this thread timed out: it is this thread's
                    self._threads -= 1
                    return
            with self._lock:
                if call.state != _QUEUED:
                    continue  # its node stopped waiting before a thread was free
                call.state = _RUNNING
                self._queued -= 1
                self._running += 1
            call.started = time.monotonic()
            value: Any = None
            error: BaseException | None = None
            try:
                value = call.fn(**call.kwargs)
            except BaseException as exc:  # handed to the awaiting node, whatever it is
                error = exc
            # The thread is free before the value wakes anyone up: a node that starts because of
            # this value must find it idle (with one thread, a chain of sync calls would
            # otherwise wait for a thread).
            with self._lock:
                self._running -= 1
                call.state = _DONE
                self._abandoned -= call.abandoned
            _deliver(call.loop, call.future, value, error)


_QUEUED, _RUNNING, _DONE, _DROPPED = range(4)


class _Call:
    """One sync call on its way through `CallThreads`; `state` changes under the threads' lock."""

    __slots__ = ("fn", "kwargs", "loop", "future", "state", "abandoned", "asked", "started")

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn, self.kwargs, self.loop = fn, kwargs, loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.state = _QUEUED
        self.abandoned = False
        self.asked = time.monotonic()
        self.started = 0.0  # written by the thread before it delivers the value


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    def settle() -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the loop is closed: nobody waits for this value any more


def sync_calls_at_once(groups: Sequence[Sequence[str]], nodes: Mapping[str, CompiledNode], targets: CallTargets) -> int:
    """The most sync `call:` nodes of one plan group (a flow's `groups` and `nodes`): how many
    threads one run may hold at once (nodes of one group may run together; an eager run may
    overlap groups a little)."""
    most = 0
    for group in groups:
        count = 0
        for name in group:
            body = nodes[name].body
            if not isinstance(body, CallBody):
                continue
            try:
                fn = targets.resolve(body.target)
            except ValueError:
                continue  # binding said so already
            count += not inspect.iscoroutinefunction(fn)
        most = max(most, count)
    return most


_shared: CallThreads | None = None


def shared_threads() -> CallThreads:
    """The process's default `CallThreads` (used when a Planner is given none)."""
    global _shared
    if _shared is None:
        _shared = CallThreads()
    return _shared


CALL = CallKind()
