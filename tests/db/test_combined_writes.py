"""Combined writes never lose an update (#19, item 7).

`coalesce: true` writes of concurrent runs are sent as one statement (`sqlinfo.combine_writes`).
In one statement every member reads one snapshot, and a row one member changed is skipped by
the next: an increment lost, a run answered `None`. Members whose target rows overlap (the same
row through other parameters, in the main statement or in a CTE, through UPDATE, DELETE or
MERGE, in one table or two) make the combined statement fail before anything is committed, and
then run one by one: every run gets what some order of separate runs would have given it.
Members that do not overlap still share one statement.

Batches are forced as in `tests/support/stacks.py`: the pool's one connection is held until every
run has joined the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from planner.lang.sqlinfo import combine_writes
from tests.support import stacks as support
from tests.support.stacks import Stack, Write

COUNTERS = "CREATE TABLE counters (id int PRIMARY KEY, name text UNIQUE NOT NULL, n int NOT NULL DEFAULT 0); " \
           "INSERT INTO counters (id, name) SELECT g, 'c' || g FROM generate_series(1, 8) g"

# Each statement adds $d to the counter it targets and returns the counter after its update.
# `id` and `name` name the target row: every variant reaches row 1 with parameters that differ.
INCREMENTS = {
    "update": "UPDATE counters SET n = n + $d WHERE id = $id RETURNING n",
    "update_by_another_column": "UPDATE counters SET n = n + $d WHERE id = $id OR name = $name RETURNING n",
    "update_in_a_cte": "WITH u AS (UPDATE counters c SET n = c.n + $d WHERE c.id = $id RETURNING c.n) SELECT n FROM u",
    "update_from": "UPDATE counters c SET n = c.n + v.d FROM (SELECT $id::int AS id, $d::int AS d) AS v "
                   "WHERE c.id = v.id RETURNING c.n",
    "update_through_a_cte_of_its_own": "WITH target AS (SELECT id FROM counters WHERE name = $name OR id = $id) "
                                       "UPDATE counters SET n = n + $d FROM target WHERE counters.id = target.id "
                                       "RETURNING counters.n",
    "merge": "MERGE INTO counters c USING (SELECT $id::int AS id, $d::int AS d) AS v ON c.id = v.id "
             "WHEN MATCHED THEN UPDATE SET n = c.n + v.d RETURNING c.n",
    "upsert": "INSERT INTO counters (id, name, n) VALUES ($id, 'u' || $d::int, $d) "
              "ON CONFLICT (id) DO UPDATE SET n = counters.n + excluded.n RETURNING n",
}


def _params(sql: str, run: int) -> dict[str, Any]:
    """Run `run` (0..5) of a variant: adds run + 1 to counter 1, each through other parameters."""
    inputs: dict[str, Any] = {"d": run + 1}
    if "$name" in sql:  # half the runs name row 1 by its name, the other half by its id
        inputs |= {"id": 1, "name": f"none{run}"} if run % 2 else {"id": 100 + run, "name": "c1"}
    else:
        inputs["id"] = 1
    return inputs


def _flow(sql: str) -> str:
    inputs = ", ".join(f"{name}: {kind}" for name, kind in (("d", "int"), ("id", "int"), ("name", "str"))
                       if f"${name}" in sql)
    return f"inputs: {{{inputs}}}\nnodes:\n  q: {{sql: {sql!r}, fetch: value, coalesce: true}}\n"


@pytest.mark.parametrize("variant", list(INCREMENTS))
async def test_six_increments_of_one_counter_in_one_batch_end_at_their_sum(
        variant: str, write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await support.run_ddl(demo_dsn, COUNTERS)
    sql = INCREMENTS[variant]
    write_flow(_flow(sql))
    stack = stacks(size=1)
    results = await stack.batched(("t", _params(sql, run)) for run in range(6))
    assert [len(members) for members in stack.spy.sent] == [6]  # they did share a batch
    rows = await support.fetch_rows(demo_dsn, "SELECT n FROM counters WHERE id = 1")
    assert rows == [{"n": 21}]  # 1 + 2 + ... + 6: no increment lost
    # Each run saw its own row after its update: the values are the running sums of one order.
    seen = sorted((r.values["q"], run + 1) for run, r in enumerate(results))
    assert all(isinstance(value, int) for value, _ in seen), seen
    total = 0
    for value, added in seen:
        total += added
        assert value == total, seen


@pytest.mark.parametrize("variant", [v for v in INCREMENTS if v != "upsert"])
async def test_increments_of_different_counters_still_share_one_statement(
        variant: str, write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await support.run_ddl(demo_dsn, COUNTERS)
    sql = INCREMENTS[variant]
    write_flow(_flow(sql))
    stack = stacks(size=1)
    runs = [{"d": run + 1, "id": run + 1, "name": f"c{run + 1}"} for run in range(6)]
    results = await stack.batched(("t", {k: v for k, v in inputs.items() if f"${k}" in sql}) for inputs in runs)
    assert [r.values["q"] for r in results] == [1, 2, 3, 4, 5, 6]
    assert len(stack.combined()) == 1 and stack.failed() == []  # one statement, not refused


async def test_a_delete_and_an_update_of_one_row_by_two_members_keep_an_order_of_their_own(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    # One member deletes row 5 (and updates row 2), the other updates row 5 (and deletes row 3).
    # In either order of separate runs, row 5 ends deleted. In one statement the member that
    # ran second skipped row 5 without a word: row 5 stayed, and the deleter was told it
    # deleted nothing.
    await support.run_ddl(demo_dsn, COUNTERS)
    write_flow("""
        inputs: {del: int, upd: int}
        nodes:
          q:
            sql: |
              WITH d AS (DELETE FROM counters WHERE id = $del RETURNING id),
                   u AS (UPDATE counters SET n = n + 1 WHERE id = $upd RETURNING id, n)
              SELECT (SELECT array_agg(id) FROM d) AS deleted, (SELECT array_agg(n) FROM u) AS updated
            fetch: one
            coalesce: true
        """)
    stack = stacks(size=1)
    deleter, updater = {"del": 5, "upd": 2}, {"del": 3, "upd": 5}
    results = await stack.batched([("t", deleter), ("t", updater)])
    assert [len(members) for members in stack.spy.sent] == [2]
    assert results[0].values["q"] == {"deleted": [5], "updated": [1]}
    assert results[1].values["q"] in ({"deleted": [3], "updated": None}, {"deleted": [3], "updated": [1]})
    assert await support.fetch_rows(demo_dsn, "SELECT id, n FROM counters WHERE id IN (2, 3, 5) ORDER BY id") == [{"id": 2, "n": 1}]


async def test_members_that_overlap_in_a_second_table_only_run_one_by_one(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await support.run_ddl(demo_dsn, COUNTERS + "; CREATE TABLE totals (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); "
                                         "INSERT INTO totals (id) VALUES (1), (2)")
    write_flow("""
        inputs: {id: int, total: int, d: int}
        nodes:
          q:
            sql: |
              WITH a AS (UPDATE counters SET n = n + $d WHERE id = $id RETURNING n),
                   b AS (UPDATE totals SET n = n + $d WHERE id = $total RETURNING n)
              SELECT (SELECT n FROM a) AS counter, (SELECT n FROM b) AS total
            fetch: one
            coalesce: true
        """)
    stack = stacks(size=1)
    results = await stack.batched(("t", {"id": run + 1, "total": 1, "d": run + 1}) for run in range(4))
    assert [r.values["q"]["counter"] for r in results] == [1, 2, 3, 4]
    assert sorted(r.values["q"]["total"] for r in results) == [1, 3, 6, 10]  # running sums: each saw its own
    assert await support.fetch_rows(demo_dsn, "SELECT n FROM totals WHERE id = 1") == [{"n": 10}]


async def test_a_combined_write_fetched_one_sends_one_row_per_member(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    # Alone, `fetch: one` asks the server for one row; combined, each member sends no more.
    await support.run_ddl(demo_dsn, COUNTERS)
    write_flow("""
        inputs: {low: int, d: int}
        nodes:
          q: {sql: "UPDATE counters SET n = n + $d WHERE id >= $low AND id < $low + 4 RETURNING id, n", fetch: one,
              coalesce: true}
        """)
    stack = stacks(size=1)
    results = await stack.batched([("t", {"low": 1, "d": 1}), ("t", {"low": 5, "d": 2})])
    assert [r.values["q"]["n"] for r in results] == [1, 2]
    assert len(stack.combined()) == 1 and stack.failed() == []
    assert await support.fetch_rows(demo_dsn, "SELECT sum(n) AS s FROM counters") == [{"s": 4 + 8}]  # every row written
    text = combine_writes("UPDATE counters SET n = n + $1 WHERE id >= $2 AND id < $2 + 4 RETURNING id, n", 2,
                          first_row=True)
    assert text is not None
    con = await asyncpg.connect(demo_dsn)
    try:
        transaction = con.transaction()
        await transaction.start()
        rows = await con.fetch(text, 1, 1, 2, 5)  # each member updates four rows
        await transaction.rollback()
    finally:
        await con.close()
    assert sorted(r["?ord"] for r in rows) == [1, 2]


@pytest.mark.parametrize("sql", [
    "UPDATE counters SET n = 1 WHERE CURRENT OF c RETURNING n",
    "MERGE INTO counters c USING (SELECT $1::int AS id) v ON c.id = v.id WHEN MATCHED THEN UPDATE SET n = 1 "
    "WHEN NOT MATCHED BY SOURCE THEN DELETE RETURNING c.n",
])
def test_a_write_whose_target_rows_cannot_be_named_is_never_combined(sql: str) -> None:
    assert combine_writes(sql, 2) is None


async def test_a_write_through_a_view_runs_one_by_one_and_is_then_never_combined(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # A view has no ctid: the overlap guard cannot name the rows it changes, so the combined
    # statement is refused; the members run one by one (none lost), and the statement is not
    # combined again, with a warning, instead of being refused on every batch.
    await support.run_ddl(demo_dsn, COUNTERS + "; CREATE VIEW counters_v AS SELECT * FROM counters")
    write_flow(_flow("UPDATE counters_v SET n = n + $d WHERE id = $id RETURNING n"))
    stack = stacks(size=1)
    first = await stack.batched(("t", {"d": run + 1, "id": 1}) for run in range(3))
    second = await stack.batched(("t", {"d": run + 4, "id": 1}) for run in range(3))
    assert sorted(r.values["q"] for r in first + second) == [1, 3, 6, 10, 15, 21]
    assert await support.fetch_rows(demo_dsn, "SELECT n FROM counters WHERE id = 1") == [{"n": 21}]
    assert len(stack.combined()) == 1  # the first batch tried once; the second was not combined
    assert [r.getMessage() for r in caplog.records if "is not combined" in r.getMessage()] != []
