"""The demo data set: deterministic, generated on the server with generate_series.

`Scale.demo()` is the realistic volume (thousands of instances and conversations, hundreds
of thousands of messages); `Scale.tiny()` is what the test suite clones per test.
Instance `acme` (escalation on, a webhook) and `quiet` (escalation off, no webhook) always
exist, with conversations for `+15550000001`..: the examples in the README use them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources

import asyncpg

from planner.db.pooler import connect
from planner.settings import Settings

DATA_VERSION = "1"


@dataclass(frozen=True)
class Scale:
    """How much demo data to load: `demo()` for `planner demo`, `tiny()` for the test suite."""

    instances: int
    phones_per_instance: int
    messages_per_conversation: int
    interactions_per_phone: int

    @classmethod
    def demo(cls) -> Scale:
        return cls(instances=2_000, phones_per_instance=10, messages_per_conversation=15, interactions_per_phone=5)

    @classmethod
    def tiny(cls) -> Scale:
        return cls(instances=5, phones_per_instance=3, messages_per_conversation=4, interactions_per_phone=3)

    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


def schema_sql() -> str:
    """The demo's schema (`planner/demo/schema.sql`)."""
    return resources.files("planner.demo").joinpath("schema.sql").read_text()


async def is_loaded(con: asyncpg.Connection, scale: Scale) -> bool:
    exists = await con.fetchval("SELECT to_regclass('planner_demo_meta') IS NOT NULL")
    if not exists:
        return False
    label = await con.fetchval("SELECT value FROM planner_demo_meta WHERE key = 'scale'")
    return bool(label == f"{DATA_VERSION}:{scale.label()}")


async def load(con: asyncpg.Connection, scale: Scale) -> None:
    """Create the schema and fill it, in one transaction."""
    async with con.transaction():
        await con.execute(schema_sql())
        await con.execute(
            "TRUNCATE whatsapp_message_buffer, escalated_conversations, whatsapp_ai_interactions, "
            "whatsapp_webhook_config, whatsapp_conversation_messages, whatsapp_conversations, "
            "whatsapp_instances, planner_demo_meta RESTART IDENTITY CASCADE"
        )
        await _fill(con, scale)
        await con.execute(
            "INSERT INTO planner_demo_meta (key, value) VALUES ('scale', $1)", f"{DATA_VERSION}:{scale.label()}"
        )
    await con.execute("ANALYZE")


async def _fill(con: asyncpg.Connection, scale: Scale) -> None:
    # Named instances first, so their ids are stable (1 and 2).
    await con.execute(
        """
        INSERT INTO whatsapp_instances (instance_name, escalation_enabled, escalation_threshold, escalation_keywords)
        VALUES ('acme', true, 3, ARRAY['human', 'agent', 'complaint', 'refund']),
               ('quiet', false, 3, ARRAY[]::text[])
        """
    )
    await con.execute(
        """
        INSERT INTO whatsapp_instances (instance_name, escalation_enabled, escalation_threshold, escalation_keywords)
        SELECT 'inst-' || lpad(g::text, 5, '0'), g % 3 <> 0, 2 + g % 4, ARRAY['human', 'agent']
        FROM generate_series(1, $1::int) AS g
        """,
        scale.instances,
    )
    await con.execute(
        """
        INSERT INTO whatsapp_webhook_config (whatsapp_instance_id, webhook_url)
        SELECT id, 'https://hooks.example.com/' || instance_name
        FROM whatsapp_instances WHERE instance_name <> 'quiet' AND id % 5 <> 0
        """
    )
    # One active conversation per (instance, phone); every third user also has an older,
    # inactive one, which find-or-create must not pick while an active one exists.
    await con.execute(
        """
        INSERT INTO whatsapp_conversations (instance_id, user_phone, is_active, last_activity)
        SELECT i.id, '+1555' || lpad(p::text, 7, '0'), true, now() - (p || ' minutes')::interval
        FROM whatsapp_instances i, generate_series(1, $1::int) AS p
        """,
        scale.phones_per_instance,
    )
    await con.execute(
        """
        INSERT INTO whatsapp_conversations (instance_id, user_phone, is_active, last_activity)
        SELECT instance_id, user_phone, false, last_activity - interval '30 days'
        FROM whatsapp_conversations WHERE id % 3 = 0
        """
    )
    await con.execute(
        """
        INSERT INTO whatsapp_conversation_messages (conversation_id, role, content, created_at)
        SELECT c.id,
               CASE WHEN m % 2 = 1 THEN 'user' ELSE 'assistant' END,
               CASE WHEN m % 2 = 1 THEN 'question ' || m || ' about order ' || c.id
                    ELSE 'answer ' || m || ': ' || repeat('details ', 5 + m % 20) END,
               c.last_activity - ((($1::int - m) * 2) || ' minutes')::interval
        FROM whatsapp_conversations c, generate_series(1, $1::int) AS m
        """,
        scale.messages_per_conversation,
    )
    await con.execute(
        """
        INSERT INTO whatsapp_ai_interactions (whatsapp_instance_id, user_phone, user_message, ai_response, metadata, created_at)
        SELECT c.instance_id, c.user_phone, 'question ' || k, 'answer ' || k,
               jsonb_build_object('sentiment', CASE WHEN (c.id + k) % 4 = 0 THEN 'negative' ELSE 'neutral' END,
                                  'resolved', (c.id + k) % 3 <> 0),
               c.last_activity - (k || ' minutes')::interval
        FROM whatsapp_conversations c, generate_series(1, $1::int) AS k
        WHERE c.is_active
        """,
        scale.interactions_per_phone,
    )
    await con.execute(
        """
        INSERT INTO whatsapp_message_buffer (instance_name, user_phone, message_text, processed)
        SELECT i.instance_name, c.user_phone, 'older message', true
        FROM whatsapp_conversations c JOIN whatsapp_instances i ON i.id = c.instance_id
        WHERE c.is_active AND c.id % 7 = 0
        """
    )


async def ensure(dsn: str, scale: Scale | None = None) -> bool:
    """Load the demo data into `dsn`'s database unless it is there already. True if it loaded."""
    scale = scale or Scale.demo()
    con = await connect(dsn, default_pooler=Settings.from_env().pooler)  # not asyncpg's own: a `?pgbouncer=` is planner's, never the server's
    try:
        if await is_loaded(con, scale):
            return False
        await load(con, scale)
        return True
    finally:
        await con.close()
