"""Serving the nodes of a compiled group from one statement, one run at a time.

Each member is bound to a backend of its own (`GroupRunner.backend_for`), so its kind's own
`run` (the `required:` check of an SQL node, say) still wraps the value. The first member of a run that the
executor starts sends the group's statement (every value it needs outside the group has
settled by then, see `planner.compile.plan_groups`); every member then takes its own rows
from that one result. The executor itself is unchanged in what it decides: it still evaluates
each member's `when:` and references on the values (`policy.prepare`), settles skips and
defaults, and only then asks the member for its value. So each node keeps its own state,
value, default, skip reason and error, as without compilation.

`cache:` members: when the statement is about to be sent, a cached member whose arguments are
known (it waits for nothing in the group, or only for members the cache answered) is looked up;
those the cache answers are left out of the statement (a variant of it, planned once per set of
answered members) and references to them become parameters. A cached member the statement
answered keeps its value in the cache, as its own statement would have.

A member served by the statement reports it on `Served.compiled` (the group's label). A member
runs alone, as it would without compilation, when
- the statement failed or timed out (it is one transaction: nothing of it was written), or
  the pool is more than half busy (`COMPILE_BELOW`: then coalescing shares each node's
  statement with other runs', as before);
- its guard was false in the statement while the executor found it should run (a `when:`
  on a default value the statement could not see, say);
- the run is sequential (`PLANNER_MODE=sequential`) or has overrides (`RUN_GROUPS` unset).
A statement the server refuses to prepare (a type the translation got wrong) turns the group
off for this flow version, with one warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

from planner.compile import CompiledGroup, Member, variant
from planner.graph import CompiledFlow
from planner.kinds.backend import SEQUENTIAL, Backend, Load, Query, WrappingBackend
from planner.lang.effects import Effects
from planner.lang.expr import evaluate
from planner.lang.nodes import CompiledNode, RetryPolicy, SqlBody
from planner.lang.refs import CompiledSql, Ref, Unresolved, resolve

Judge = Callable[[CompiledNode], Awaitable[Effects]]
"""The server catalog's verdict on a node's statement (`planner.db.effects.EffectsBackend.effects`)."""


class ValueCache(Protocol):
    """What compiled groups ask of the value cache (`planner.db.cache.CacheBackend`)."""

    async def peek(self, query: Query) -> tuple[bool, Any]: ...

    def generation(self, flow: str, node: str) -> int | None: ...

    def keep(self, query: Query, value: Any, generation: int) -> None: ...

logger = logging.getLogger("planner")

COMPILE_BELOW = 0.5
"""Send compiled statements while fewer than this share of the pool's connections are in use;
above it each node goes alone, where coalescing shares it with other runs' (see BENCHMARKS.md)."""

RUN_GROUPS: ContextVar[dict[int, asyncio.Future[Any]] | None] = ContextVar("planner_run_groups", default=None)
"""Set by the executor for each run that may use compiled groups: the run's statements in flight."""

_FALLBACK = None


Outcome = dict[str, tuple[bool, Any]]
"""What one statement gave each of its members: whether the member's guard was true, and its value."""


class GroupRunner:
    """One compiled group of one flow version, for every run of it."""

    def __init__(self, group: CompiledGroup, flow: CompiledFlow, backend: Backend,
                 cache: ValueCache | None = None, args: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
                 load: Load | None = None, judge: Judge | None = None) -> None:
        # `load`: the pool's (None: a backend of the caller's own, judged idle). `judge`: the
        # server's catalog (None: there is none to ask, and the offline plan stands).
        self.group, self.flow, self.backend, self.cache, self.load = group, flow, backend, cache, load
        self.judge = judge
        self.whens = {n.name: n.when for n in group.nodes}
        self.stops_run = {n.name: n.on_error != "default" for n in group.nodes}  # None: the Planner's, maybe fail
        self.args = args or {}
        names = set(group.names)
        # Cached members in the flow's order, with the members they wait for.
        self.cached = [(n.name, tuple(d for d in n.deps if d in names)) for n in group.nodes
                       if n.sql.cache_ttl is not None and cache is not None and n.name in self.args]
        self.variants: dict[frozenset[str], tuple[CompiledGroup, CompiledNode, dict[str, Member]] | None] = {}
        self.variants[frozenset()] = self._prepared(group)
        self.broken: str | None = None
        self.below = COMPILE_BELOW
        self.sent = 0  # statements sent (figures for tests and benchmarks)
        self.fell_back = 0  # statements that failed: their members ran alone
        self._layout: dict[tuple[str, ...], tuple[list[tuple[int, int]], list[int]]] = {}

    def _prepared(self, group: CompiledGroup | None) -> tuple[CompiledGroup, CompiledNode, dict[str, Member]] | None:
        if group is None:
            return None
        refs = tuple(p.ref if p.ref is not None else Ref(f"?{p.kind}{':' + p.member if p.member else ''}")
                     for p in group.params)
        node = CompiledNode(
            name=group.label, index=-1, deps=(), refs=(), when=None, default=None, on_error="default",
            timeout=group.timeout, retry=RetryPolicy(), latency=None, flow=group.flow,
            body=SqlBody(statements=(CompiledSql(group.text, refs),), fetch="records"))
        return group, node, {m.name: m for m in group.members}

    def backend_for(self, name: str) -> Backend:
        """The backend member `name` is bound to: its queries are answered from the group's
        statement when they can be, else passed to the planner's backend as without compilation."""
        return _Member(self, name)

    async def _send(self, values: dict[str, Any]) -> tuple[Outcome, dict[str, int]] | None:
        if self.load is not None and not self.load.idle(self.below):
            return _FALLBACK
        if not await self._reads_proven_pure():
            return _FALLBACK
        known: dict[str, Any] = {}
        tickets: dict[str, int] = {}  # cached members the statement answers: their generation when sent
        if self.cached:
            assert self.cache is not None
            for name, inside in self.cached:
                if any(d not in known for d in inside):
                    continue  # waits for a member the statement answers: its arguments are not known yet
                merged = {**values, **known} if known else values
                try:
                    query = self.args[name](merged)
                except Exception:
                    continue  # skipped or failing: the statement's guard says the same
                hit, value = await self.cache.peek(query)
                if hit:
                    known[name] = value
            for name, _ in self.cached:
                generation = self.cache.generation(self.group.flow, name)
                if name not in known and generation is not None:
                    tickets[name] = generation
        key = frozenset(known)
        if key not in self.variants:
            self.variants[key] = self._prepared(variant(self.flow, self.group, key))
        prepared = self.variants[key]
        if prepared is None:
            return _FALLBACK
        group, node, members = prepared
        merged = {**values, **known} if known else values
        try:
            params = [self._param(p, merged, members) for p in group.params]
        except _Fails as fails:
            if self.stops_run[str(fails)]:
                return _FALLBACK  # it may stop the run before the nodes after it: all alone, as without compilation
            params = [self._param(p, merged, members, lenient=True) for p in group.params]
        self.sent += 1
        try:
            records = await self.backend.run(Query(node, [params], run=None))
        except Exception as exc:
            self.fell_back += 1
            state = str(getattr(exc, "sqlstate", "") or "")
            if state.startswith(("42", "0A")):  # the statement itself is wrong: never again for this version
                self.broken = f"{type(exc).__name__}: {exc}"
                logger.warning("flow %s: compiled statement %s does not run (%s); its nodes run alone from now on",
                               self.group.flow, self.group.label, exc, extra={"flow": self.group.flow})
            else:
                logger.info("flow %s: compiled statement %s failed (%s); its nodes run alone for this run",
                            self.group.flow, self.group.label, exc, extra={"flow": self.group.flow})
            return _FALLBACK
        return self._split(group, records), tickets

    async def _reads_proven_pure(self) -> bool:
        """Whether the one effects model (the server's catalog, `planner.db.catalog`) agrees that
        every member the plan took for a read only reads. The plan was made offline, from syntax
        and a list of pure built-ins: a view over a volatile function, or a user's overload of a
        built-in's name, looks like a read there. One statement sees one snapshot, so such a
        member may not share it: the group goes alone, now and for this flow version."""
        if self.broken is not None:
            return False
        judge = self.judge
        if judge is None:
            return True  # no server's catalog to ask (a backend of the caller's own): the offline plan stands
        for node in self.group.nodes:
            if not node.sql.read_only:
                continue
            effects = await judge(node)
            if not effects.pure and effects.resolved:
                self.broken = f"{node.name}: {effects.why()}"
                logger.warning("flow %s: compiled statement %s is not used: node %s is not a pure read (%s); its nodes "
                               "run alone", self.group.flow, self.group.label, node.name, effects.why(),
                               extra={"flow": self.group.flow})
                return False
            if not effects.pure:
                return False  # not judged yet (the server could not be asked): alone this time
        return True

    def _param(self, param: Any, values: dict[str, Any], members: dict[str, Member], lenient: bool = False) -> Any:
        if param.kind == "lit":
            return param.value
        if param.kind == "ref":
            try:
                return resolve(param.ref, values)
            except Exception:
                return None  # the member's guard is false: its statement runs with null and is discarded
        try:
            return self._python_guard(members[param.member], values)
        except _Fails:
            if not lenient:
                raise
            return False  # it fails alone (it defaults: the run goes on), and writes nothing here

    def _python_guard(self, member: Member, values: dict[str, Any]) -> bool:
        """Whether the executor would run `member`, as far as values outside the statement tell.
        Raises `_Fails` when it would fail the node instead (a typo'd field, a `when:` that
        compares the incomparable)."""
        try:
            for ref in member.external:
                resolve(ref, values)
            if member.python_when:
                when = self.whens[member.name]
                return bool(evaluate(when, values)) if when is not None else True
        except Unresolved:
            return False
        except Exception:
            raise _Fails(member.name) from None
        return True

    def _split(self, group: CompiledGroup, records: list[Any]) -> Outcome:
        members = group.members
        if not records:
            raise AssertionError("a compiled statement returns its guard row")
        keys = tuple(records[0].keys())
        known = self._layout.get(keys)
        if known is None:
            starts = [keys.index(f"#{m.index}") for m in members]
            ends = [*starts[1:], len(keys)]
            known = self._layout[keys] = ([(s, e) for s, e in zip(starts, ends, strict=True)],
                                          [keys.index(f"?{m.index}") for m in members])
        layout, guards_at = known
        head = records[0]
        rows: list[list[Any]] = [[] for _ in members]
        for record in records[1:]:
            k = record[0]
            if record[layout[k - 1][0]] is not None:
                rows[k - 1].append(record)
        out: Outcome = {}
        for m, (start, end), at, own in zip(members, layout, guards_at, rows, strict=True):
            out[m.name] = (bool(head[at]), _value(m, keys[start + 1:end], own, start + 1, end))
        return out


class _Fails(Exception):
    """A member the executor would fail before running it (the message is its name)."""


class _Member(WrappingBackend):
    """One member's backend: `run` through its group, `open` and `close` to the planner's backend."""

    def __init__(self, runner: GroupRunner, name: str) -> None:
        super().__init__(runner.backend)
        self.runner, self.name = runner, name

    async def run(self, query: Query) -> Any:
        """The member's value from its group's statement (the run's first member to start sends
        it, the others await the same future), or from its own query sent down the stack."""
        runner = self.runner
        groups = RUN_GROUPS.get()
        if groups is None or runner.broken is not None or SEQUENTIAL.get():
            return await runner.backend.run(query)
        number = runner.group.number
        future = groups.get(number)
        if future is None:
            values: Any = query.run  # the run's values (`kinds.sql` binds it so)
            future = groups[number] = asyncio.ensure_future(runner._send(values))
        try:
            outcome = await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            outcome = _FALLBACK  # another member was cancelled, not this one
        mine = None if outcome is _FALLBACK else outcome[0].get(self.name)
        if mine is None or not mine[0]:
            # Not in the statement (the cache answered it, or the statement failed), or its guard
            # was false there while the executor found it should run: alone.
            return await runner.backend.run(query)
        value = mine[1]
        query.served.compiled = runner.group.label
        query.served.compiled_nodes = len(outcome[0])  # they share its round trip (metrics count it once)
        ticket = outcome[1].get(self.name)
        if ticket is not None and runner.cache is not None:
            runner.cache.keep(query, value, ticket)
        return value


def _value(member: Member, names: tuple[str, ...], rows: list[Any], start: int, end: int) -> Any:
    if member.fetch == "none":
        return f"{member.status} {len(rows)}"
    if member.fetch == "value":
        return rows[0][start] if rows and end > start else None
    if len(set(names)) == len(names):
        dicts = [dict(zip(names, record[start:end], strict=True)) for record in rows]
    else:
        dicts = []
        for record in rows:
            row: dict[str, Any] = {}
            for key, value in zip(names, record[start:end], strict=True):
                row.setdefault(key, value)  # asyncpg's dict(record) keeps the first of repeated names
            dicts.append(row)
    if member.fetch == "one":
        return dicts[0] if dicts else None
    return dicts
