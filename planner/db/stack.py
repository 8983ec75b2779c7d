"""The one place that builds a `Planner`'s database stack: `build_stack(...) -> Stack`.

    EffectsBackend -> CacheBackend -> [ReplicaBackend ->] FusingBackend -> CoalescingBackend -> PoolBackend
       (outermost)                     (replica side: FusingBackend -> CoalescingBackend -> PoolBackend)

Each wrapper decides *how* a query reaches the database, never *what* it returns (see
`planner.kinds.backend`). A wrapper wraps the narrow `Backend` (open, run, close); what else
it needs of the pool is given here, explicitly: coalescing its `batches=`, fusion its `fuser=`,
the cache the channel's `via=`, the replica router the primary's pool; compiled groups and
`call:` nodes' `db` get `Stack.primary_pool` and `Stack.database` through `Planner`. `Stack` names every part, so that nobody reaches the pool through
`backend.inner.inner...`: `stack.pools["primary"]` is the primary's `PoolBackend`,
`stack.cache` the value cache, `stack.replica` the router (None without a replica),
`stack.effects` the outermost wrapper (`stack.backend`) and its catalog.

`Planner.__init__` calls `build_stack`; tests and benchmarks that need a part of the stack
build one here (or read `planner.stack`). Its arguments are `Planner`'s database keywords and
option groups (`PoolOptions`, `CacheOptions`, `ReplicaOptions`, below), each meaning what it
means there (see `planner.api.Planner`):

- `dsn`/`pool`: the primary (an owned pool from a DSN, or a borrowed asyncpg pool); neither:
  `database_url`, else the embedded server. `pool_options` configure the pool(s).
- `backend`: a backend of the caller's own, used as given instead of planner's pools: only
  the cache and the effects wrapper go above it. A `PoolBackend` found under it (its
  wrappers' `inner`) still gives the catalog its connection.
- `replica_options`: a read replica (its `dsn`; None or "" for none) with a stack of its own,
  routed per node (`planner.db.replica`).
- `cache_options`: the cache's size and channel (None: invalidations stay in this process; so
  they do behind a transaction-mode pooler, which LISTEN cannot pass, and over a caller's own
  backend with no planner pool under it, which has no channel to carry them).

- What the environment says (`planner.settings.Settings`, read by the facade and passed in
  here; nothing in this package reads the environment): `coalesce`, `fuse`, `cache` (the
  switches `PLANNER_COALESCE`, `PLANNER_FUSE`, `PLANNER_CACHE`), `database_url`
  (`DATABASE_URL`), `embedded_default` (`PLANNER_EMBEDDED`, below `embedded=`) and
  `default_pooler` (`PLANNER_POOLER`, below `pooler=` and a DSN's `?pgbouncer=`). Their
  defaults are the environment ignored. A `backend=` is used as given: the switches reach
  only the wrappers built here, and the cache.

Adding a wrapper to planner's stack is a change of this module (and of the wrapper's own).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planner.db.cache import DEFAULT_SIZE, CacheBackend
from planner.db.catalog import Catalog, catalog_of
from planner.db.coalesce import CoalescingBackend
from planner.db.effects import EffectsBackend
from planner.db.fuse import FusingBackend
from planner.db.replica import ReplicaBackend, parse_max_lag
from planner.kinds.backend import Backend, Database

if TYPE_CHECKING:
    from planner.db.pool import PoolBackend

CACHE_CHANNEL = "planner_cache"
"""The LISTEN/NOTIFY channel that carries cache invalidations between processes."""


@dataclass(frozen=True)
class PoolOptions:
    """A pool planner owns (`Planner(pool_options=PoolOptions(...))`; one per server).

    `min_size`/`max_size` size it; `full_reset=True` keeps asyncpg's reset query on release
    (planner resets a connection only when a statement may have changed its session).
    `pooler="transaction"` runs behind PgBouncer's transaction mode (else the DSN's
    `?pgbouncer=`, else `PLANNER_POOLER`); the cache then stays in its process (LISTEN cannot
    pass such a pooler). `embedded=False` (else `PLANNER_EMBEDDED`) forbids the embedded
    fallback: with no `dsn=`, `pool=` or `DATABASE_URL`, a run raises `DatabaseUnavailable`.
    """

    min_size: int = 2
    max_size: int = 10
    full_reset: bool = False
    pooler: str | None = None
    embedded: bool | None = None


@dataclass(frozen=True)
class CacheOptions:
    """The values `cache:` nodes keep (`Planner(cache_options=CacheOptions(...))`).

    `size` bounds how many (all nodes together). Invalidations reach the other processes on the
    same database through LISTEN/NOTIFY on `channel` (None: this process only); while a process
    cannot listen, its cache is not used (its values may have gone stale without it knowing).
    """

    size: int = DEFAULT_SIZE
    channel: str | None = CACHE_CHANNEL


@dataclass(frozen=True)
class ReplicaOptions:
    """A read replica (`Planner(replica_options=ReplicaOptions(...))`, or `replica_dsn=` alone).

    `dsn` (None: `DATABASE_REPLICA_URL`; "" for none) gets a pool and a stack of its own: reads a
    replica may answer go to it while it is up and lags less than `max_lag` (a duration such as
    "2s", or seconds; None: `PLANNER_REPLICA_MAX_LAG`, else 10 s), everything else to the primary.
    """

    dsn: str | None = None
    max_lag: str | float | None = None


@dataclass
class Stack:
    """A built stack, its parts by name. `backend` is the outermost: what runs every query.

    `primary_pool` is the primary's `PoolBackend`: planner's own, or the one found under a
    caller's own backend (None when there is none); compiled groups ask it how busy the pool
    is. `database` is what `describe` (hot edits) and a `call:` node's `db` parameter use: that
    pool, else a caller's backend that is a `Database` itself (`Offline`), else None."""

    backend: Backend
    effects: EffectsBackend
    cache: CacheBackend
    replica: ReplicaBackend | None = None
    pools: dict[str, PoolBackend] = field(default_factory=dict)  # planner's own pools by role (primary, replica)
    database: Database | None = None
    primary_pool: PoolBackend | None = None
    fusers: dict[str, FusingBackend] = field(default_factory=dict)  # planner's own, by the role of their pool
    coalescers: dict[str, CoalescingBackend] = field(default_factory=dict)  # likewise

    @property
    def catalog(self) -> Catalog | None:
        """The server's verdicts on statements (None over a backend with no planner pool under it)."""
        return self.effects.catalog

    @property
    def primary(self) -> PoolBackend:
        """`primary_pool`; `LookupError` when the stack has none (a caller's own backend without one)."""
        if self.primary_pool is None:
            raise LookupError("this stack has no PoolBackend of planner's: its backend is the caller's own")
        return self.primary_pool

    async def close(self) -> None:
        """Close every part, outermost first (each closes what it wraps)."""
        await self.backend.close()


def build_stack(
    *,
    dsn: str | None = None,
    pool: Any = None,
    backend: Backend | None = None,
    pool_options: PoolOptions = PoolOptions(),
    cache_options: CacheOptions = CacheOptions(),
    replica_options: ReplicaOptions = ReplicaOptions(),
    coalesce: bool = True,
    fuse: bool = True,
    cache: bool = True,
    database_url: str | None = None,
    embedded_default: bool = True,
    default_pooler: str | None = None,
) -> Stack:
    """Build planner's database stack (see the module's docstring). Opens nothing: the pools
    connect at their first use. Raises `TypeError` for a replica with `backend`, and
    `ValueError` for a bad `pooler` or `max_lag`."""
    pools: dict[str, PoolBackend] = {}
    fusers: dict[str, FusingBackend] = {}
    coalescers: dict[str, CoalescingBackend] = {}
    replica: ReplicaBackend | None = None
    primary: PoolBackend | None

    def shares(pool: PoolBackend, role: str) -> FusingBackend:
        # Fusion and coalescing, each given the pool as what runs its shared statements.
        coalescer = coalescers[role] = CoalescingBackend(pool, batches=pool, enabled=coalesce)
        fuser = fusers[role] = FusingBackend(coalescer, fuser=pool, enabled=fuse)
        return fuser

    channel = cache_options.channel
    if backend is None:
        from planner.db.dsn import TRANSACTION_POOLER
        from planner.db.pool import PoolBackend  # asyncpg is imported with a pool of planner's only

        def own(**where: Any) -> PoolBackend:
            return PoolBackend(min_size=pool_options.min_size, max_size=pool_options.max_size,
                               full_reset=pool_options.full_reset, pooler=pool_options.pooler,
                               default_pooler=default_pooler, **where)

        primary = pools["primary"] = first = own(dsn=dsn, pool=pool, embedded=pool_options.embedded,
                                                 database_url=database_url, embedded_default=embedded_default)
        if first.pooler == TRANSACTION_POOLER:
            channel = None  # LISTEN cannot pass a transaction pooler: the cache stays per process
        backend = shares(first, "primary")
        if replica_options.dsn:  # the same stack on the replica's own pool, routed per node
            secondary = pools["replica"] = own(dsn=replica_options.dsn)
            backend = replica = ReplicaBackend(backend, shares(secondary, "replica"), dsn=replica_options.dsn,
                                               primary_pool=first, max_lag=parse_max_lag(replica_options.max_lag))
    elif replica_options.dsn:
        raise TypeError("replica_dsn= applies to planner's own backend; with backend=, wrap yours in "
                        "planner.db.replica.ReplicaBackend")
    else:
        primary = pool_under(backend)
    # A hit never reaches the database, or anything in between. Invalidations travel on the
    # primary's pool; a caller's backend with none under it keeps them in this process.
    channel = channel if primary is not None else None
    values = CacheBackend(backend, maxsize=cache_options.size, channel=channel,
                          via=primary.channel if primary is not None and channel is not None else None, enabled=cache)
    # The outermost: what each statement does, from the server's catalog, decides whether the
    # wrappers below may cache, route, fuse or coalesce it (`planner.lang.effects`).
    effects = EffectsBackend(values, catalog_of(primary) if primary is not None else None)
    if "replica" in pools and effects.catalog is not None:
        # The replica's pool decides whether a stale read may run again from the same verdict.
        pools["replica"].verdict = effects.catalog.known
    database: Database | None = primary if primary is not None else backend if isinstance(backend, Database) else None
    return Stack(effects, effects, values, replica, pools, database, primary, fusers, coalescers)


def pool_under(backend: Backend) -> PoolBackend | None:
    """Planner's `PoolBackend` at the bottom of a caller's own stack (`backend=`), followed
    through its wrappers' `inner` once, here, so that the catalog, `describe`, `call:` pools
    and compiled groups reach it explicitly; None when the stack ends in a backend of the
    caller's own (then each of those is judged without it, as its docstring says)."""
    module = sys.modules.get("planner.db.pool")  # not loaded: no pool of planner's below (asyncpg stays unloaded)
    if module is None:
        return None
    seen: Any = backend
    while seen is not None and not isinstance(seen, module.PoolBackend):
        seen = getattr(seen, "inner", None)
    found: PoolBackend | None = seen
    return found
