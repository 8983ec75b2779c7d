-- The chat backend of the seed analysis: WhatsApp bot instances, their conversations and
-- messages, webhook configuration, AI interactions, escalations and the message buffer.
-- Indexes are the ones such a service needs for the lookups of the two seed flows.

CREATE TABLE IF NOT EXISTS whatsapp_instances (
    id                    bigserial PRIMARY KEY,
    instance_name         text NOT NULL UNIQUE,
    escalation_enabled    boolean NOT NULL DEFAULT false,
    escalation_threshold  integer NOT NULL DEFAULT 3 CHECK (escalation_threshold > 0),
    escalation_keywords   text[] NOT NULL DEFAULT '{}',
    created_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS whatsapp_conversations (
    id             bigserial PRIMARY KEY,
    instance_id    bigint NOT NULL REFERENCES whatsapp_instances (id),
    user_phone     text NOT NULL,
    is_active      boolean NOT NULL DEFAULT true,
    last_activity  timestamptz NOT NULL DEFAULT now(),
    created_at     timestamptz NOT NULL DEFAULT now()
);
-- Find-or-create looks up (instance, phone), active first, newest first.
CREATE INDEX IF NOT EXISTS whatsapp_conversations_lookup
    ON whatsapp_conversations (instance_id, user_phone, is_active DESC, last_activity DESC);
-- At most one active conversation per user of an instance.
CREATE UNIQUE INDEX IF NOT EXISTS whatsapp_conversations_one_active
    ON whatsapp_conversations (instance_id, user_phone) WHERE is_active;

CREATE TABLE IF NOT EXISTS whatsapp_conversation_messages (
    id               bigserial PRIMARY KEY,
    conversation_id  bigint NOT NULL REFERENCES whatsapp_conversations (id),
    role             text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content          text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS whatsapp_conversation_messages_recent
    ON whatsapp_conversation_messages (conversation_id, created_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS whatsapp_webhook_config (
    id                    bigserial PRIMARY KEY,
    whatsapp_instance_id  bigint NOT NULL UNIQUE REFERENCES whatsapp_instances (id),
    webhook_url           text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS whatsapp_ai_interactions (
    id                    bigserial PRIMARY KEY,
    whatsapp_instance_id  bigint NOT NULL REFERENCES whatsapp_instances (id),
    user_phone            text NOT NULL,
    user_message          text NOT NULL,
    ai_response           text,
    metadata              jsonb NOT NULL DEFAULT '{}',
    created_at            timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS whatsapp_ai_interactions_recent
    ON whatsapp_ai_interactions (whatsapp_instance_id, user_phone, created_at DESC);

CREATE TABLE IF NOT EXISTS escalated_conversations (
    id                    bigserial PRIMARY KEY,
    whatsapp_instance_id  bigint NOT NULL REFERENCES whatsapp_instances (id),
    user_phone            text NOT NULL,
    reason                text NOT NULL,
    is_active             boolean NOT NULL DEFAULT true,
    escalated_at          timestamptz NOT NULL DEFAULT now(),
    resolved_at           timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS escalated_conversations_one_active
    ON escalated_conversations (whatsapp_instance_id, user_phone) WHERE is_active;

CREATE TABLE IF NOT EXISTS whatsapp_message_buffer (
    id             bigserial PRIMARY KEY,
    instance_name  text NOT NULL,
    user_phone     text NOT NULL,
    message_text   text NOT NULL,
    processed      boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS whatsapp_message_buffer_pending
    ON whatsapp_message_buffer (instance_name, user_phone) WHERE NOT processed;

CREATE TABLE IF NOT EXISTS planner_demo_meta (
    key    text PRIMARY KEY,
    value  text NOT NULL
);
