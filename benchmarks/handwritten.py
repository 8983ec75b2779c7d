"""What a user writes by hand instead of planner: the seed flows' statements directly on asyncpg.

`naive_*` awaits them one after another on one connection (the code the seed started from);
`gather_*` runs them in the `asyncio.gather` groups the seed's plan drew, each query in its
own `async with pool.acquire()` (the idiomatic way), with allSettled-style defaults.
The SQL is taken from the flow files, so both sides send exactly the same statements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg

from planner import load_flow

FLOWS = Path(__file__).resolve().parent.parent / "flows"


def _statements(flow: str, expected: dict[str, list[tuple[str, ...]]]) -> dict[str, list[str]]:
    """Each node's SQL texts, after checking the parameter order the code below relies on."""
    compiled = load_flow(FLOWS / f"{flow}.yaml")
    out = {}
    for name, params in expected.items():
        statements = compiled.nodes[name].sql.statements
        assert [tuple(str(p) for p in s.params) for s in statements] == params, (name, statements)
        out[name] = [s.text for s in statements]
    return out


PB = _statements("process_buffered", {
    "instance": [("$instance_name",)],
    "conversation": [("$instance.id", "$user_phone")],
    "webhook_config": [("$instance.id",)],
    "is_escalated": [("$instance.id", "$user_phone")],
    "is_duplicate": [("$conversation.id", "$message")],
    "history": [("$conversation.id", "$history_limit", "$history_chars")],
    "recent_messages": [("$conversation.id",)],
    "store_message": [("$conversation.id", "$message", "$instance_name", "$user_phone")],
    "mark_duplicate_processed": [("$instance_name", "$user_phone")],
})
ESC = _statements("escalation", {
    "settings": [("$instance_id",)],
    "interactions": [("$instance_id", "$user_phone")],
    "record": [("$instance_id", "$user_phone", "$decide.reason")],
})


def _dicts(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


async def naive_process_buffered(pool: asyncpg.Pool, i: dict[str, Any]) -> dict[str, Any]:
    async with pool.acquire() as con:
        inst = await con.fetchrow(PB["instance"][0], i["instance_name"])
        conv = await con.fetchrow(PB["conversation"][0], inst["id"], i["user_phone"])
        webhook = await con.fetchrow(PB["webhook_config"][0], inst["id"])
        escalated = await con.fetchval(PB["is_escalated"][0], inst["id"], i["user_phone"]) if inst["escalation_enabled"] else False
        duplicate = await con.fetchval(PB["is_duplicate"][0], conv["id"], i["message"])
        history = _dicts(await con.fetch(PB["history"][0], conv["id"], 20, 3200))
        recent = _dicts(await con.fetch(PB["recent_messages"][0], conv["id"]))
        stored = await _store(con, conv["id"], duplicate, i)
    return {"conversation_id": conv["id"], "duplicate": duplicate, "stored": stored, "webhook": webhook,
            "escalated": escalated, "history": history, "recent": recent}


async def _store(con: asyncpg.Connection, conversation_id: int, duplicate: bool, i: dict[str, Any]) -> Any:
    if duplicate:
        await con.execute(PB["mark_duplicate_processed"][0], i["instance_name"], i["user_phone"])
        return None
    row = await con.fetchrow(PB["store_message"][0], conversation_id, i["message"], i["instance_name"], i["user_phone"])
    return row["message_id"]


async def _q(pool: asyncpg.Pool, method: str, sql: str, *args: Any) -> Any:
    async with pool.acquire() as con:
        return await getattr(con, method)(sql, *args)


async def _settled(default: Any, awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except Exception:  # allSettled: a failed lookup takes its default (a real service would log it)
        return default


async def _const(value: Any) -> Any:
    return value


async def gather_process_buffered(pool: asyncpg.Pool, i: dict[str, Any]) -> dict[str, Any]:
    inst = await _q(pool, "fetchrow", PB["instance"][0], i["instance_name"])
    conv, webhook, escalated = await asyncio.gather(
        _q(pool, "fetchrow", PB["conversation"][0], inst["id"], i["user_phone"]),
        _settled({"webhook_url": None}, _q(pool, "fetchrow", PB["webhook_config"][0], inst["id"])),
        _settled(False, _q(pool, "fetchval", PB["is_escalated"][0], inst["id"], i["user_phone"]))
        if inst["escalation_enabled"] else _const(False),
    )
    duplicate, history, recent = await asyncio.gather(
        _settled(False, _q(pool, "fetchval", PB["is_duplicate"][0], conv["id"], i["message"])),
        _settled([], _q(pool, "fetch", PB["history"][0], conv["id"], 20, 3200)),
        _settled([], _q(pool, "fetch", PB["recent_messages"][0], conv["id"])),
    )
    async with pool.acquire() as con:
        stored = await _store(con, conv["id"], duplicate, i)
    return {"conversation_id": conv["id"], "duplicate": duplicate, "stored": stored, "webhook": webhook,
            "escalated": escalated, "history": _dicts(history), "recent": _dicts(recent)}


async def naive_escalation(pool: asyncpg.Pool, i: dict[str, Any]) -> dict[str, Any]:
    from planner.demo.escalation import needs_escalation

    async with pool.acquire() as con:
        settings = await con.fetchrow(ESC["settings"][0], i["instance_id"])
        interactions = _dicts(await con.fetch(ESC["interactions"][0], i["instance_id"], i["user_phone"]))
        decision = {"escalate": False, "reason": None}
        if settings is not None and settings["escalation_enabled"]:
            decision = await needs_escalation(dict(settings), interactions, i["message"])
        record = await con.fetchval(ESC["record"][0], i["instance_id"], i["user_phone"], decision["reason"]) if decision["escalate"] else None
    return {**decision, "escalation_id": record}


async def gather_escalation(pool: asyncpg.Pool, i: dict[str, Any]) -> dict[str, Any]:
    from planner.demo.escalation import needs_escalation

    settings, interactions = await asyncio.gather(
        _settled(None, _q(pool, "fetchrow", ESC["settings"][0], i["instance_id"])),
        _settled([], _q(pool, "fetch", ESC["interactions"][0], i["instance_id"], i["user_phone"])),
    )
    decision = {"escalate": False, "reason": None}
    if settings is not None and settings["escalation_enabled"]:
        decision = await needs_escalation(dict(settings), _dicts(interactions), i["message"])
    record = await _q(pool, "fetchval", ESC["record"][0], i["instance_id"], i["user_phone"], decision["reason"]) if decision["escalate"] else None
    return {**decision, "escalation_id": record}
