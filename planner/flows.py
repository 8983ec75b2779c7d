"""The flow versions a Planner serves: each flow compiled and bound once, cached by file stamp,
and replaced on a later run when its file changes (hot reload).

An edited file is recompiled off the event loop once it has stopped changing; until then, and
when an edit no longer loads (or, with the pool open, the server refuses a changed statement),
the last good version keeps running: the error is logged and kept in `reload_errors`.
Binding a compiled flow to a backend is the Planner's (`bind`, given here).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from planner.config import FlowSource
from planner.errors import FlowError, FlowFileError, QueryError
from planner.graph import CompiledFlow, compile_flow
from planner.kinds import BindEnv, BoundNode, kind_of, written_statements
from planner.lang.loader import FileStamp, load_spec
from planner.lang.refs import name_params
from planner.lang.sqlcheck import syntax_errors
from planner.run.compiled import GroupRunner

logger = logging.getLogger("planner")

QUIET_S = 0.25
"""A flow file rewritten in place is taken once planner has seen it unchanged for this long, on
its own monotonic clock (never the file's mtime against the wall clock): a writer that
truncates and then writes (`cat >`, scp) is never caught half way. A file replaced by rename
(write elsewhere, then `mv`: complete at once) is taken by the very next run."""

EDIT_CHECK_S = 5.0
"""How long a hot edit's changed statement may take to be prepared on the server."""

NO_FILE = FileStamp(0, 0, 0, 0, 0)  # a flow given as an object, not read from a file


@dataclass(frozen=True)
class FlowVersion:
    """One compiled flow bound to a Planner: what its runs run."""

    stamp: FileStamp  # of the file it was read from (`NO_FILE` for a flow given as an object)
    flow: CompiledFlow
    bound: dict[str, BoundNode]
    needs_db: bool
    compiled: tuple[GroupRunner, ...] = ()  # the flow's compiled groups (`planner.compile`)


Bind = Callable[[CompiledFlow, FileStamp], FlowVersion]
"""`bind(flow, stamp) -> FlowVersion`: the Planner's binding of a compiled flow."""


class FlowVersions:
    """The versions of one flows folder's flows (and of flows given as objects) a Planner runs."""

    def __init__(self, source: FlowSource, env: BindEnv, bind: Bind) -> None:
        self.source = source
        self.env = env  # its backend prepares a hot edit's changed statements
        self._bind = bind
        self.reload_errors: dict[str, FlowError] = {}
        self._versions: dict[str, FlowVersion] = {}
        self._reloading: dict[str, asyncio.Future[FlowVersion]] = {}
        self._failed: dict[str, FileStamp] = {}  # the stamp of a file that did not load
        self._seen: dict[str, tuple[FileStamp, float]] = {}  # a rewrite in place: its stamp, first seen (monotonic)
        self._objects: weakref.WeakKeyDictionary[CompiledFlow, FlowVersion] = weakref.WeakKeyDictionary()

    def get(self, name: str) -> FlowVersion | None:
        """The version of flow `name` cached now, if any (nothing is read)."""
        return self._versions.get(name)

    def load(self, name: str) -> FlowVersion:
        """`entry` without the event loop: compiled here, never checked on the server."""
        entry = self._versions.get(name)
        path, stamp = self._stamp(name, entry)
        if entry is not None and entry.stamp == stamp:
            return entry
        return self._reload(name, path, stamp, entry)

    async def entry(self, name: str, *, on_server: bool = False) -> FlowVersion:
        """The version of flow `name` to run now: the cached one unless its file changed and is
        ready to be taken (`QUIET_S`); a new one is compiled on a thread, and with `on_server`
        (the pool is open) a hot edit's changed statements are prepared first. Runs that ask
        while a version is being made wait for that one. Raises for a flow that never loaded."""
        entry = self._versions.get(name)
        path, stamp = self._stamp(name, entry)
        if entry is not None and entry.stamp == stamp:
            return entry
        if entry is not None and not self._ready(name, entry, stamp):
            return entry  # the last good version, for now
        pending = self._reloading.get(name)
        if pending is None:
            pending = self._reloading[name] = asyncio.ensure_future(
                self._reload_checked(name, path, stamp, entry, on_server))
            pending.add_done_callback(lambda _f: self._reloading.pop(name, None))
        return await asyncio.shield(pending)

    async def _reload_checked(self, name: str, path: Path, stamp: FileStamp, entry: FlowVersion | None,
                              on_server: bool) -> FlowVersion:
        """`_reload` for a run: compiled on a thread (the loop goes on serving other runs), and a
        hot edit's changed statements prepared on the server once the pool is open."""
        try:
            new = await asyncio.to_thread(self._compile, path, stamp, entry)
            if entry is not None and on_server:
                await self._check_on_server(new.flow, entry.flow)
        except FlowError as exc:
            return self._refuse(name, stamp, entry, exc)
        return self._accept(name, new)

    async def _check_on_server(self, flow: CompiledFlow, running: CompiledFlow) -> None:
        """Prepare each statement the edit changed (as `planner validate --db` does): one the
        server refuses as a bug of the flow (SQLSTATE class 42: syntax, an unknown table, column
        or function, wrong types) is a `FlowFileError` at its node. A server that cannot be
        asked (down, busy past `EDIT_CHECK_S`; none under a caller's own backend) does not delay
        the edit: it is logged."""
        database = self.env.database
        for name, node in flow.nodes.items():
            old = running.nodes.get(name)
            known = {st.text for st in old.sql.statements} if old is not None else set()
            for index, statement in enumerate(node.sql.statements):
                if statement.text in known:
                    continue
                try:
                    if database is None:
                        raise FlowError("this planner's backend has no database to prepare it on")
                    await asyncio.wait_for(database.describe(statement.text), EDIT_CHECK_S)
                except QueryError as exc:
                    if not exc.is_bug:
                        logger.warning("flow %s: node %s's edited statement was not checked on the server: %s",
                                       flow.name, name, exc, extra={"flow": flow.name})
                        continue
                    where = ("nodes", name, "sql") + ((index,) if len(node.sql.statements) > 1 else ())
                    line, column = flow.marks.at(where)
                    raise FlowFileError(f"the server refuses this statement: {name_params(str(exc), statement)}",
                                        file=flow.marks.file, line=line, column=column, node=name,
                                        code="PLN400") from exc
                except (TimeoutError, FlowError) as exc:
                    why = f"no answer within {EDIT_CHECK_S:g} s" if isinstance(exc, TimeoutError) else str(exc)
                    logger.warning("flow %s: node %s's edited statement was not checked on the server: %s",
                                   flow.name, name, why, extra={"flow": flow.name})

    def _ready(self, name: str, entry: FlowVersion, stamp: FileStamp) -> bool:
        """Whether the file of a running flow, changed to `stamp`, is to be loaded now.

        Another file than the one last seen at the path (a rename: complete at once) is, at
        first sight. The same file rewritten in place is once planner has seen it unchanged
        for `QUIET_S` of its own monotonic clock (the file's times are never compared with
        the clock). A file that failed to load is not tried again until it changes.
        """
        now = time.monotonic()
        last = self._seen.get(name)
        if last is None or last[0] != stamp:  # first sight of this stamp
            previous = last[0] if last is not None else entry.stamp
            self._seen[name] = (stamp, now)
            return not previous.same_file(stamp) and self._failed.get(name) != stamp
        return now - last[1] >= QUIET_S and self._failed.get(name) != stamp

    def _stamp(self, name: str, entry: FlowVersion | None) -> tuple[Path, FileStamp]:
        # One stat per run for a cached flow; the folder is searched only when it is not.
        path = entry.flow.loaded.path if entry is not None else self.source.path_of(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            try:
                path = self.source.path_of(name)  # renamed (.yaml <-> .yml) or gone: search again
            except FlowFileError:
                self._forget(name)  # deleted: a new file of that name is a new flow (its inode may be the old one's)
                raise
            st = path.stat()
        return path, FileStamp.of(st)

    def _forget(self, name: str) -> None:
        for kept in (self._versions, self._seen, self._failed, self.reload_errors):
            kept.pop(name, None)

    def _reload(self, name: str, path: Path, stamp: FileStamp, entry: FlowVersion | None) -> FlowVersion:
        try:
            new = self._compile(path, stamp, entry)
        except FlowError as exc:
            return self._refuse(name, stamp, entry, exc)
        return self._accept(name, new)

    def _compile(self, path: Path, stamp: FileStamp, entry: FlowVersion | None) -> FlowVersion:
        flow = compile_flow(load_spec(path))
        read = flow.loaded.stamp or stamp  # the stamp of the very file that was read
        if FileStamp.of(path.stat()) != read:
            raise FlowFileError("the file changed while it was read; trying again on the next run", file=path)
        if entry is not None:  # a hot edit replaces a running version only once `planner validate` passes it
            _check_edit(flow, self.env)
        # Back into the Planner (`Planner._bind`, given at construction): binding needs its
        # backend, threads and compiled groups, which this cache of versions does not hold.
        return self._bind(flow, read)

    def _refuse(self, name: str, stamp: FileStamp, entry: FlowVersion | None, exc: FlowError) -> FlowVersion:
        """Keep the last good version (none: raise), and say why once per failing file."""
        self._failed[name] = stamp
        if entry is None:
            raise exc
        if str(self.reload_errors.get(name)) != str(exc):
            logger.error("flow %s: edit does not load, still running the last good version: %s", name, exc,
                         extra={"flow": name})
        self.reload_errors[name] = exc
        return entry

    def _accept(self, name: str, new: FlowVersion) -> FlowVersion:
        self.reload_errors.pop(name, None)
        self._seen.pop(name, None)
        self._versions[name] = new
        return new

    def of(self, flow: CompiledFlow) -> FlowVersion:
        """The bound version of a flow given as an object (`load_flow`), made once per flow."""
        entry = self._objects.get(flow)
        if entry is None:
            entry = self._objects[flow] = self._bind(flow, NO_FILE)
        return entry


def _check_edit(flow: CompiledFlow, env: BindEnv) -> None:
    """The offline checks of `planner validate` that compiling does not make: each kind's own
    (call targets and their signatures) and SQL syntax (pglast). Raises the first as a
    `FlowFileError`, saying how many more there are."""
    problems = [exc for node in flow.nodes.values() for exc in kind_of(node.kind).check(node, flow.marks, env)]
    problems += syntax_errors(flow.loaded, flow.nodes, written_statements(flow.loaded))
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FlowFileError(first.message + more, file=first.file, line=first.line, column=first.column,
                            node=first.node, code=first.code)
