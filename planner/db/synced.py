"""A connection that knows when the server is left mid-statement, and ends that before reuse.

Why. asyncpg prepares a statement it has not prepared on a connection yet with Parse, Describe
and Flush, and no Sync: the Sync comes with the Bind and Execute that follow. The Parse has
begun an implicit transaction on the server (parse analysis takes the statement's locks, and
`now()` is fixed from then on), which only that Sync ends. When no execution follows, the
server stays there (`pg_stat_activity`: `active`, waiting on `ClientRead`, `xact_start` set)
until the connection's next statement, in the pool, holding its locks (a migration's ALTER
TABLE queues behind them, and every statement of the table behind the ALTER); and that next
statement is executed in the same transaction, its `now()` the time of the abandoned Parse. It happens
- when asyncpg cannot encode an argument (`DataError`: an int where text is expected): it
  encodes only after preparing, and raises without sending anything more;
- after `prepare()` alone (asyncpg's own reset query would end it at release; a pool planner
  owns skips that reset);
- behind a transaction pooler too, on the first use of a statement on a connection (the
  pooler keeps the server connection with the client until the transaction ends).
asyncpg ends the sequence itself when the server refuses the Parse or a cancel comes during it.

What. `SyncedConnection` keeps whether the last statement on it may have been left so:
set by every statement lookup (`_get_statement`, which may send that Parse), cleared when an
execution completes (its Sync was answered, the server's error too). `settle()` then ends the
implicit transaction with a ROLLBACK (nothing of it was executed, nothing is undone that a caller was
told of). `planner.db.pool.PoolBackend` settles a connection before giving it back to its pool
and between the statements it sends one after the other on one connection.
"""

from __future__ import annotations

from typing import Any

import asyncpg


class SyncedConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that tracks whether the server may be mid extended-protocol
    sequence (a Parse not yet followed by a Sync), and can end it (`settle`). See the module."""

    # Whether a statement on it may have left the server after its Parse, before a Sync (an
    # implicit transaction open, holding the statement's locks).
    _unsynced = False

    async def settle(self) -> bool:
        """End an implicit transaction left open by a statement that was prepared and never
        executed (see the module), outside a transaction block only: inside one, the block's
        own COMMIT or ROLLBACK ends it. Returns whether a ROLLBACK was sent."""
        if not self._unsynced or self.is_closed() or self.is_in_transaction():
            return False
        # Outside a block, ROLLBACK rolls the implicit transaction back (the server's WARNING
        # "there is no transaction in progress" is a notice asyncpg drops unless listened to).
        await self.execute("ROLLBACK")
        return True

    async def _get_statement(self, query: str, timeout: float | None, *,  # noqa: ASYNC109 - asyncpg's signature
                             named: Any = False, use_cache: bool = True, ignore_custom_codec: bool = False,
                             record_class: Any = None) -> Any:
        self._unsynced = True  # a statement not prepared here yet is prepared without a Sync
        return await super()._get_statement(query, timeout, named=named, use_cache=use_cache,
                                            ignore_custom_codec=ignore_custom_codec, record_class=record_class)

    async def _do_execute(self, query: str, executor: Any, timeout: float | None,  # noqa: ASYNC109 - asyncpg's signature
                          retry: bool = True, **kwargs: Any) -> Any:
        try:
            result = await super()._do_execute(query, executor, timeout, retry, **kwargs)
        except asyncpg.PostgresError as exc:
            # The server's own error (asyncpg waited for its ReadyForQuery) leaves nothing open;
            # asyncpg's `DataError` for a value it could not encode is a PostgresError too
            # (SQLSTATE 22000) but the server never saw it: only the server's carry a severity.
            if _from_server(exc):
                self._unsynced = False
            raise
        self._unsynced = False
        return result

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 - asyncpg's signature
        if args:
            return await super().execute(query, *args, timeout=timeout)  # type: ignore[no-any-return]
        # A simple query ends whatever extended sequence came before it (its own Sync).
        try:
            status = await super().execute(query, timeout=timeout)
        except asyncpg.PostgresError as exc:
            if _from_server(exc):
                self._unsynced = False
            raise
        self._unsynced = False
        return status  # type: ignore[no-any-return]


def _from_server(exc: BaseException) -> bool:
    """Whether `exc` is an error the server sent (asyncpg raises some of its own as PostgresError)."""
    return getattr(exc, "severity", None) is not None


def synced_connection(con: Any) -> SyncedConnection | None:
    """`con` (or the connection a pool's proxy stands for) if it is a `SyncedConnection`."""
    if isinstance(con, asyncpg.pool.PoolConnectionProxy):
        con = con._con
    return con if isinstance(con, SyncedConnection) else None


async def settle(con: Any) -> bool:
    """`con.settle()` for a `SyncedConnection` (or a pool's proxy of one); a connection of
    another class (a borrowed pool's) is left to its pool's own reset. Returns whether a
    ROLLBACK was sent."""
    synced = synced_connection(con)
    return False if synced is None else await synced.settle()
