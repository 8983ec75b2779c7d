"""What a statement does: one verdict, and the decisions every sharing mechanism takes from it.

A statement is *pure* when it is proven to do nothing but read: one plain query (no
INSERT/UPDATE/DELETE/MERGE, no `FOR UPDATE/SHARE`, no `SELECT ... INTO`, no DDL) and, by the
server's catalog, no call of anything with effects. Anything else is a *write* for every
decision, and so is a statement not resolved yet: not proven is not pure.

    statement --syntax (planner.sqlinfo, at compile time)--> write, or "reads, if its calls are pure"
              --catalog (planner.catalog, first prepared on a server)--> Effects: pure, or why not

`decide` turns a node and its statement's `Effects` into the decisions of the sharing
mechanisms, all from the one verdict:

| decision | a pure read | a write (or not proven pure) |
|---|---|---|
| `share`: identical parameters of concurrent runs get one answer (single-flight) | yes | never |
| `coalesce`: sent in one statement with other runs' | yes (unless `coalesce: false`) | only with `coalesce: true`, each run its own member |
| `fuse`: sent in one statement with sibling reads of its run | yes (unless `fuse: false`) | never |
| `cache` (`cache:`) | yes | never (an error at `planner validate --db` and at bind) |
| `replica` | yes, unless a node it follows may write | never: the primary |
| `write`: later nodes of the run read their own writes (the primary) | no | yes |

`as_allowed(node, effects)` is the node as its verdict allows it, as the database wrappers see it: a node whose statement is
not proven pure loses `read_only`, `fuse`, `cache_ttl` and `replica`, and keeps `coalesce`
only when its author wrote `coalesce: true`. The wrappers (cache, replica routing, fusion,
coalescing, the pool's batch path) read those fields and nothing else, so they cannot
disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.lang.nodes import CompiledNode


@dataclass(frozen=True, slots=True)
class Effects:
    """What one statement may do beyond reading, as far as it is known.

    `pure`: proven to read only. `resolved`: the verdict comes from the server's catalog (not
    from syntax alone). `reasons`: why it is not pure, in words a user can act on (each names
    the function, the lock or the clause). `functions`: the functions with effects it calls, as
    the server spells them (`public.claim_job()`, `random()`)."""

    pure: bool
    resolved: bool = False
    reasons: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()

    @property
    def write(self) -> bool:
        """Whether it counts as a write for every decision (`not pure`)."""
        return not self.pure

    def why(self) -> str:
        """The reasons, as one sentence ("" when pure)."""
        return "; ".join(self.reasons)


UNRESOLVED = Effects(pure=False, reasons=("not yet resolved against the server's catalog",))
"""A statement whose calls the server has not judged: not proven pure, so a write."""

SYNTAX_WRITE = "it writes, locks rows, changes the session or calls a function with effects"


def of_syntax(node: CompiledNode) -> Effects:
    """The compile-time verdict (no server): a write when the syntax says so (or the statement
    calls a built-in the catalog lists as having effects, `planner.lang.sqlinfo`), else unresolved:
    its functions, operators and views are the catalog's to judge."""
    sql = node.sql
    if not sql.read_only:
        reason = "a statement list (one transaction)" if len(sql.statements) > 1 else SYNTAX_WRITE
        return Effects(pure=False, resolved=True, reasons=(reason,))
    return UNRESOLVED


@dataclass(frozen=True, slots=True)
class Decisions:
    """What may be done with one node's statement (see the module's table)."""

    share: bool
    coalesce: bool
    fuse: bool
    cache: bool
    replica: bool
    write: bool


def decide(node: CompiledNode, effects: Effects, *, after_write: bool = False) -> Decisions:
    """The decisions for `node` whose statement has `effects`; `after_write`: a node it follows
    (references, `after:`) may write in the same run."""
    sql = node.sql
    pure = effects.pure and sql.read_only
    return Decisions(
        share=pure and sql.coalesce,
        coalesce=sql.coalesce and (pure or sql.coalesce_writes),
        fuse=pure and sql.fuse,
        cache=pure and sql.cache_ttl is not None,
        replica=pure and sql.replica and not after_write,
        write=not pure,
    )


def as_allowed(node: CompiledNode, effects: Effects, *, after_write: bool = False) -> CompiledNode:
    """`node` with its sharing fields set from `decide` (the node itself when nothing changes)."""
    if effects.pure and not after_write:
        return node  # the compiled fields already say what a pure statement may do (the hot path)
    d = decide(node, effects, after_write=after_write)
    sql = node.sql
    read_only = sql.read_only and not d.write  # coalescing merges identical parameters of read-only nodes only
    cache_ttl = sql.cache_ttl if d.cache else None
    if (read_only, d.coalesce, d.fuse, cache_ttl, d.replica) == (
            sql.read_only, sql.coalesce, sql.fuse, sql.cache_ttl, sql.replica):
        return node
    return replace(node, body=replace(sql, read_only=read_only, coalesce=d.coalesce, fuse=d.fuse,
                                      cache_ttl=cache_ttl, replica=d.replica))
