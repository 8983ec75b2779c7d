"""`call:` nodes: a Python function behind the allow-list, async or sync.

The allow-list is enforced at bind time, before anything runs (see `planner.config.CallTargets`).
Sync functions run on `CallThreads`, daemon threads of planner's own, never the event loop's
default executor: a sync call that times out cannot be stopped (Python cannot kill a thread),
so it keeps its thread until it returns; planner counts such threads, refuses new sync calls
with a clear error once all are busy instead of queueing them behind the stuck ones, and never
keeps the process alive for them at exit.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from planner.errors import FlowFileError, NodeError
from planner.kinds import BindEnv, Body, BoundNode
from planner.lang.models import CallNode
from planner.lang.refs import RefSyntaxError, compile_getter, parse_value

if TYPE_CHECKING:
    from planner.lang.loader import Marks
    from planner.lang.nodes import CompiledNode

DEFAULT_THREADS = 32
IDLE_S = 60.0  # an idle thread ends after this long


class CallKind:
    name: Literal["call"] = "call"
    refs_at = "with"
    shape: Literal["box", "round"] = "round"
    model = CallNode

    def compile(self, name: str, node: CallNode, marks: Marks) -> Body:
        try:
            template = parse_value(node.with_)
        except RefSyntaxError as exc:
            raise marks.error(str(exc), ("nodes", name, "with")) from None
        return Body(refs=template.refs, fields={"call": node.call, "args": template.value})

    def bind(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> BoundNode:
        fn, wants_db = self._resolve(spec, marks, env)
        args = compile_getter(spec.args)
        if inspect.iscoroutinefunction(fn):
            if not wants_db:
                # The common case, kept to one coroutine: the executor awaits the function's own.
                return BoundNode(spec, args, lambda kwargs: fn(**kwargs))
            backend = env.backend

            async def run_with_db(kwargs: dict[str, Any]) -> Any:
                kwargs["db"] = await backend.pool()
                return await fn(**kwargs)

            return BoundNode(spec, args, run_with_db)
        threads = env.threads or shared_threads()
        backend = env.backend

        async def run_sync(kwargs: dict[str, Any]) -> Any:
            if wants_db:
                kwargs["db"] = await backend.pool()
            return await threads.run(fn, kwargs)

        return BoundNode(spec, args, run_sync)

    def needs_database(self, spec: CompiledNode) -> bool:
        return False  # a `db` parameter opens the pool when the function is called

    def check(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> list[FlowFileError]:
        try:  # exactly the checks a run makes: the allow-list, and `with:` against the signature
            self._resolve(spec, marks, env)
        except FlowFileError as exc:
            return [exc]
        return []

    def _resolve(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> tuple[Callable[..., Any], bool]:
        try:
            fn = env.targets.resolve(spec.call)
        except ValueError as exc:
            raise marks.error(str(exc), ("nodes", spec.name, "call"), code="PLN300") from None
        signature = inspect.signature(fn)
        wants_db = "db" in signature.parameters
        try:
            signature.bind(**dict.fromkeys(spec.args), **({"db": None} if wants_db else {}))
        except TypeError as exc:
            why, key = _misfit(signature, list(spec.args), wants_db, str(exc))
            where = ("nodes", spec.name, "with") + ((key,) if key is not None else ())
            raise marks.error(f"with: does not fit {spec.call}{signature}: {why}", where, code="PLN301") from None
        return fn, wants_db


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
    """At most `size` daemon threads running sync `call:` functions.

    A call finds an idle thread or starts one; when all `size` are busy it fails at once with
    a `NodeError` that says how many are held by calls that already timed out. A thread idle
    for `idle_s` ends, so that the threads of a Planner that is no longer used do not stay.
    """

    def __init__(self, size: int = DEFAULT_THREADS, *, idle_s: float = IDLE_S) -> None:
        self.size = size
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._busy = 0
        self._abandoned = 0
        self._threads = 0
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.rejected = 0  # calls refused because every thread was busy
        self.on_wait: Callable[[float], None] | None = None  # told (on the loop) how long each call waited for a thread

    @property
    def busy(self) -> int:
        """Threads running a call now (those whose node timed out or was cancelled included)."""
        return self._busy

    @property
    def threads(self) -> int:
        """Threads started and not ended (busy or idle)."""
        return self._threads

    @property
    def abandoned(self) -> int:
        """Threads still running a call nobody waits for any more (it timed out or was cancelled)."""
        return self._abandoned

    async def run(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        state = {"finished": False, "abandoned": False}
        times = [time.monotonic(), 0.0]  # asked, started (written by the thread before it delivers)

        def work() -> None:
            times[1] = time.monotonic()
            value: Any = None
            error: BaseException | None = None
            try:
                value = fn(**kwargs)
            except BaseException as exc:  # handed to the awaiting node, whatever it is
                error = exc
            # The thread is free before the value wakes anyone up: a node that starts because of
            # this value must find it idle (with one thread, a chain of sync calls would
            # otherwise fail as "all threads busy").
            with self._lock:
                self._busy -= 1
                state["finished"] = True
                self._abandoned -= state["abandoned"]
            _deliver(loop, future, value, error)

        with self._lock:
            if self._busy >= self.size:
                self.rejected += 1
                raise NodeError(
                    f"all {self.size} threads for sync calls are busy ({self._abandoned} of them still running "
                    "calls that timed out: a thread cannot be stopped); not started"
                )
            self._busy += 1
            start = self._busy > self._threads
            if start:
                self._threads += 1
            # Queued under the lock: an idle thread about to end sees it and stays.
            self._work.put(work)
        if start:
            threading.Thread(target=self._serve, name=f"planner-call-{id(self):x}", daemon=True).start()
        try:
            value = await future
        except asyncio.CancelledError:
            with self._lock:
                if not state["finished"]:
                    state["abandoned"] = True
                    self._abandoned += 1
            raise
        except BaseException:
            self._waited(times)
            raise
        self._waited(times)
        return value

    def _waited(self, times: list[float]) -> None:
        if self.on_wait is not None and times[1]:
            self.on_wait(times[1] - times[0])

    def _serve(self) -> None:
        while True:
            try:
                item = self._work.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if not self._work.empty():
                        continue  # queued while this thread timed out: it is this thread's
                    self._threads -= 1
                    return
            item()


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


_shared: CallThreads | None = None


def shared_threads() -> CallThreads:
    """The process's default `CallThreads` (used when a Planner is given none)."""
    global _shared
    if _shared is None:
        _shared = CallThreads()
    return _shared


CALL = CallKind()
