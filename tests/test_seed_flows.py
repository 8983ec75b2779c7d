"""The two seed flows of the chat backend, end to end on the demo schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from planner import FlowFailed, NodeState, Planner, load_flow

FLOWS = Path(__file__).resolve().parent.parent / "flows"
ACME, QUIET = 1, 2  # ids of the demo's named instances


@pytest.fixture(params=["cache", "no cache"])
async def seed(request: pytest.FixtureRequest, demo_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Planner]:
    """The seed flows, with their `cache:` values kept and (PLANNER_CACHE=0) without: every test
    must pass both ways."""
    monkeypatch.setenv("PLANNER_CACHE", "1" if request.param == "cache" else "0")
    async with Planner(flows=FLOWS, dsn=demo_dsn) as planner:
        yield planner


@pytest.fixture
async def con(demo_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(demo_dsn)
    yield connection
    await connection.close()


def _message(phone: str = "+15550000001", message: str = "where is my order?", instance: str = "acme") -> dict[str, Any]:
    return {"instance_name": instance, "user_phone": phone, "message": message}


def test_process_buffered_has_the_seed_groups() -> None:
    groups = [set(g) for g in load_flow(FLOWS / "process_buffered.yaml").groups]
    assert groups == [
        {"instance"},
        {"conversation", "webhook_config", "is_escalated"},
        {"is_duplicate", "history", "recent_messages"},
        {"store_message", "mark_duplicate_processed"},
    ]


def test_escalation_reads_settings_and_interactions_together() -> None:
    assert load_flow(FLOWS / "escalation.yaml").groups == (("settings", "interactions"), ("decide",), ("record",))


async def test_a_new_message_is_stored_with_its_context(seed: Planner, con: asyncpg.Connection) -> None:
    result = await seed.run("process_buffered", _message())
    out = result.output
    assert result.status == "ok" and out["duplicate"] is False and isinstance(out["stored"], int)
    assert out["webhook_url"] == "https://hooks.example.com/acme"
    assert out["history"] and all(set(row) == {"role", "content", "created_at"} for row in out["history"])
    assert sum(len(r["content"]) for r in out["history"][:-1]) < 3200
    stored = await con.fetchval(
        "SELECT count(*) FROM whatsapp_conversation_messages WHERE conversation_id = $1 AND content = $2",
        out["conversation_id"], "where is my order?",
    )
    assert stored == 1


async def test_a_duplicate_message_is_not_stored_twice(seed: Planner, con: asyncpg.Connection) -> None:
    first = await seed.run("process_buffered", _message(message="same text"))
    second = await seed.run("process_buffered", _message(message="same text"))
    assert second.output["duplicate"] is True
    assert second.nodes["store_message"].state is NodeState.SKIPPED
    assert second.nodes["mark_duplicate_processed"].state is NodeState.OK
    count = await con.fetchval(
        "SELECT count(*) FROM whatsapp_conversation_messages WHERE conversation_id = $1 AND content = 'same text'",
        first.output["conversation_id"],
    )
    assert count == 1


async def test_the_buffer_is_marked_processed_with_the_store(seed: Planner, con: asyncpg.Connection) -> None:
    await con.execute("INSERT INTO whatsapp_message_buffer (instance_name, user_phone, message_text) VALUES ('acme', '+15550000002', 'part one')")
    await seed.run("process_buffered", _message(phone="+15550000002", message="part one"))
    assert await con.fetchval("SELECT count(*) FROM whatsapp_message_buffer WHERE user_phone = '+15550000002' AND NOT processed") == 0


async def test_the_buffer_stays_unprocessed_when_the_store_fails(seed: Planner, con: asyncpg.Connection) -> None:
    await con.execute("INSERT INTO whatsapp_message_buffer (instance_name, user_phone, message_text) VALUES ('acme', '+15550000003', 'x')")
    with pytest.raises(FlowFailed) as info:
        await seed.run("process_buffered", _message(phone="+15550000003", message="bad \x00 byte"))
    assert info.value.result.nodes["store_message"].state is NodeState.FAILED
    assert await con.fetchval("SELECT count(*) FROM whatsapp_message_buffer WHERE user_phone = '+15550000003' AND NOT processed") == 1


async def test_a_new_user_gets_a_new_conversation(seed: Planner, con: asyncpg.Connection) -> None:
    result = await seed.run("process_buffered", _message(phone="+19990000000"))
    assert result.values["conversation"]["created"] is True
    assert result.output["history"] == []  # read before the store, in the same run
    assert await con.fetchval("SELECT count(*) FROM whatsapp_conversations WHERE user_phone = '+19990000000'") == 1


async def test_an_inactive_conversation_is_reactivated_only_without_an_active_one(seed: Planner, con: asyncpg.Connection) -> None:
    await con.execute("UPDATE whatsapp_conversations SET is_active = false WHERE instance_id = 1 AND user_phone = '+15550000003'")
    result = await seed.run("process_buffered", _message(phone="+15550000003"))
    assert result.values["conversation"]["reactivated"] is True
    active = await con.fetchval("SELECT count(*) FROM whatsapp_conversations WHERE instance_id = 1 AND user_phone = '+15550000003' AND is_active")
    assert active == 1


async def test_a_missing_webhook_config_row_gives_null_and_the_run_goes_on(seed: Planner) -> None:
    result = await seed.run("process_buffered", _message(instance="quiet"))
    assert result.output["webhook_url"] is None and result.output["stored"] is not None


async def test_a_failed_webhook_lookup_yields_its_default_and_the_run_goes_on(seed: Planner, con: asyncpg.Connection) -> None:
    # The lookup fails when it runs (division by zero, 22012): an error of the moment, not of the flow.
    await con.execute("ALTER TABLE whatsapp_webhook_config RENAME TO webhook_config_kept; "
                      "CREATE VIEW whatsapp_webhook_config AS SELECT whatsapp_instance_id, "
                      "(1 / (id - id))::text AS webhook_url FROM webhook_config_kept")
    result = await seed.run("process_buffered", _message())
    node = result.nodes["webhook_config"]
    assert node.state is NodeState.DEFAULTED and node.value == {"webhook_url": None}
    assert result.status == "ok" and result.nodes["store_message"].state is NodeState.OK


async def test_a_webhook_lookup_of_a_table_that_is_gone_fails_the_run(seed: Planner, con: asyncpg.Connection) -> None:
    # 42P01: the flow no longer matches the schema, which no fallback value can hide.
    await con.execute("DROP TABLE whatsapp_webhook_config")
    with pytest.raises(FlowFailed) as info:
        await seed.run("process_buffered", _message())
    assert info.value.result.nodes["webhook_config"].state is NodeState.FAILED


async def test_escalation_state_is_only_read_when_the_instance_enables_it(seed: Planner) -> None:
    result = await seed.run("process_buffered", _message(instance="quiet"))
    assert result.nodes["is_escalated"].state is NodeState.SKIPPED and result.output["escalated"] is False
    assert (await seed.run("process_buffered", _message())).nodes["is_escalated"].state is NodeState.OK


async def test_an_injection_attempt_is_stored_as_text(seed: Planner, con: asyncpg.Connection) -> None:
    evil = "'); DROP TABLE whatsapp_instances; --"
    result = await seed.run("process_buffered", _message(message=evil))
    assert result.output["stored"] is not None
    assert await con.fetchval("SELECT count(*) FROM whatsapp_conversation_messages WHERE content = $1", evil) == 1
    assert await con.fetchval("SELECT count(*) FROM whatsapp_instances") > 0


async def test_an_unknown_instance_skips_everything_after_it(seed: Planner, con: asyncpg.Connection) -> None:
    before = await con.fetchval("SELECT count(*) FROM whatsapp_conversations")
    result = await seed.run("process_buffered", _message(instance="nobody"))
    assert result.values["instance"] is None
    assert {n for n, s in result.states().items() if s != "skipped"} == {"instance"}
    assert result.output["conversation_id"] is None and result.output["stored"] is None
    assert await con.fetchval("SELECT count(*) FROM whatsapp_conversations") == before


async def test_escalation_is_recorded_on_a_keyword(seed: Planner, con: asyncpg.Connection) -> None:
    result = await seed.run("escalation", {"instance_id": ACME, "user_phone": "+15550000001", "message": "I want a HUMAN now"})
    assert result.output["escalate"] is True and result.output["reason"] == "keyword: human"
    row = await con.fetchrow("SELECT reason FROM escalated_conversations WHERE id = $1", result.output["escalation_id"])
    assert row["reason"] == "keyword: human"


async def test_escalation_is_not_recorded_when_the_rules_say_no(seed: Planner, con: asyncpg.Connection) -> None:
    await con.execute("UPDATE whatsapp_ai_interactions SET metadata = '{}'")
    result = await seed.run("escalation", {"instance_id": ACME, "user_phone": "+15550000001", "message": "thanks"})
    assert result.output == {"escalate": False, "reason": None, "escalation_id": None}
    assert result.nodes["record"].state is NodeState.SKIPPED
    assert await con.fetchval("SELECT count(*) FROM escalated_conversations") == 0


async def test_escalation_is_not_decided_when_the_instance_disables_it(seed: Planner, con: asyncpg.Connection) -> None:
    result = await seed.run("escalation", {"instance_id": QUIET, "user_phone": "+15550000001", "message": "human please"})
    assert result.nodes["decide"].state is NodeState.SKIPPED and result.output["escalate"] is False
    assert await con.fetchval("SELECT count(*) FROM escalated_conversations") == 0


async def test_escalation_on_repeated_messages(seed: Planner, con: asyncpg.Connection) -> None:
    await con.execute("UPDATE whatsapp_ai_interactions SET metadata = '{}', user_message = 'hello?' WHERE whatsapp_instance_id = 1 AND user_phone = '+15550000002'")
    result = await seed.run("escalation", {"instance_id": ACME, "user_phone": "+15550000002", "message": "hello?"})
    assert result.output["reason"].startswith("repeated message")


async def test_escalation_on_troubled_interactions_above_the_threshold(seed: Planner, con: asyncpg.Connection) -> None:
    await con.execute("UPDATE whatsapp_ai_interactions SET metadata = '{\"sentiment\": \"negative\"}' WHERE whatsapp_instance_id = 1")
    result = await seed.run("escalation", {"instance_id": ACME, "user_phone": "+15550000001", "message": "ok"})
    assert result.output["reason"] == "3 troubled interactions (threshold 3)"


@pytest.mark.slow  # every seed flow in three modes
async def test_the_three_modes_give_the_same_results_on_the_seed_flows(pg_dsn: str, demo_template: str) -> None:
    from planner.testing.pytest_plugin import fresh_database

    outputs = []
    for mode in ("eager", "layered", "sequential"):
        async with fresh_database(pg_dsn, template=demo_template) as dsn, Planner(flows=FLOWS, dsn=dsn) as planner:
            one = await planner.run("process_buffered", _message(), mode=mode)
            two = await planner.run("process_buffered", _message(), mode=mode)
            esc = await planner.run("escalation", {"instance_id": ACME, "user_phone": "+15550000001", "message": "agent!"}, mode=mode)
            outputs.append([(r.states(), _stable(r.output)) for r in (one, two, esc)])
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.slow  # every seed flow with and without the cache
async def test_the_cache_changes_no_result_of_the_seed_flows(pg_dsn: str, demo_template: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.testing.pytest_plugin import fresh_database

    outputs, hits = [], []
    for switch in ("1", "0"):
        monkeypatch.setenv("PLANNER_CACHE", switch)
        async with fresh_database(pg_dsn, template=demo_template) as dsn, Planner(flows=FLOWS, dsn=dsn) as planner:
            runs = [await planner.run("process_buffered", _message(phone=phone, message=text, instance=instance))
                    for phone, text, instance in [("+15550000001", "hi", "acme"), ("+15550000001", "hi", "acme"),
                                                  ("+15550000004", "hello", "acme"), ("+15550000001", "hi", "quiet"),
                                                  ("+15550000005", "yo", "quiet"), ("+15550000001", "x", "nobody")]]
            for message in ("thanks", "a HUMAN please", "agent!"):
                runs.append(await planner.run("escalation", {"instance_id": ACME, "user_phone": "+15550000001",
                                                             "message": message}))
            outputs.append([(r.states(), _stable(r.output)) for r in runs])
            hits.append(sum(bool(n.served and n.served.cached) for r in runs for n in r.nodes.values()))
    assert outputs[0] == outputs[1]
    assert hits[0] >= 8 and hits[1] == 0  # instance, webhook_config and settings were served from the cache


def _stable(output: dict[str, Any]) -> dict[str, Any]:
    """Output without timestamps (they differ between databases, not between modes)."""
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "created_at"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    stable: dict[str, Any] = strip(output)
    return stable
