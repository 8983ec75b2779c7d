"""Compiling a flow's SQL nodes into the fewest statements its data allows (issue 21).

Connected `sql:` nodes with no `call:` node between them become one statement: each node a
CTE of its own (`"n:name"`), a `$node.field` reference a scalar subquery on that node's CTE,
and every node's rows returned by one result, tagged per node, each column with its own
PostgreSQL type (no json, no arrays): the rows of node k are the rows whose first column is k.

    WITH "n:conversation" AS (UPDATE ... WHERE <guard> RETURNING ...),
         "n:history" AS (SELECT * FROM (<history's SELECT, $conversation.id ->
                          (SELECT "n:conversation".id FROM "n:conversation" LIMIT 1)>) AS "?q" WHERE <guard>)
    SELECT "#k".i, ... FROM (VALUES (0), (1), (2)) AS "#k"(i)
      LEFT JOIN (<each node's guard>) ON i = 0
      LEFT JOIN (SELECT row_number() OVER () AS "#1", * FROM "n:conversation") AS "q1" ON i = 1 ...

A node's *guard* is what decides, inside the statement, whether it runs: its `when:` and the
references it needs, exactly as the executor decides it (`policy.prepare`). A write whose guard
is false changes nothing (the guard is written into its WHERE, or its INSERT's source); a read
whose guard is false returns no rows. Python keeps the last word: the executor still decides
each node's state from the values, and a node the executor runs whose guard was false in the
statement sends its own statement after it (see `planner.run.compiled`).

What may not share a statement splits the group (the next round trip), decided by
`effects_of` from PostgreSQL's parser: a node that reads or writes a table an earlier node of
the group writes (one statement sees one snapshot, and two writes of one table in one
statement are undefined), unless their `when:` exclude each other; a statement list (a
transaction of its own); a statement that may change the session; a call of a function not
known to be a pure built-in; locking reads; a `when:` the translation below cannot say; a
reference whose shape SQL cannot take (a whole row, a list, a field of a field).

`when:` translation (`translate_when`): references to nodes of the group, `and`, `or`, `not`,
`==`/`!=` (as IS [NOT] DISTINCT FROM: null equals null, as in Python), `in`/`not in` a list of
literals, `<`/`<=`/`>`/`>=` against a number literal (and only when the reference is not
null, where Python would raise), literals (bound as parameters). A bare reference is true
only when it is boolean true. A `when:` that refers only to inputs and settled nodes outside
the group is evaluated by Python itself and sent as a boolean parameter. Anything else (a
`when:` that mixes both, a comparison of two lists...) keeps the node out of the group.

Nothing here runs anything: `plan_groups` is pure, called once per flow version. Two modules:
`grouping` decides which nodes share a statement (`explain`, `plan_groups`, `compiled_trips`),
`statement` writes that statement (`translate_when`, `variant`); `planner.run.compiled` runs it.
"""

from planner.compile.grouping import PURE_FUNCTIONS, Effects, compiled_trips, effects_of, eligible, explain, plan_groups
from planner.compile.statement import CompiledGroup, Member, Param, Untranslatable, translate_when, variant

__all__ = ["PURE_FUNCTIONS", "CompiledGroup", "Effects", "Member", "Param", "Untranslatable", "compiled_trips",
           "effects_of", "eligible", "explain", "plan_groups", "translate_when", "variant"]
