-- Channels beyond the inbox (issue 15): the application's user_channels, a channel column on its
-- preferences, and herald's outbox of deliveries. Every index names the query that uses it;
-- tests/integration/test_explain.py checks those plans on realistic volumes.

-- The application owns this table (it may have created it already, hence IF NOT EXISTS): where each
-- user wants notifications beyond the inbox. channel 'email' (address: an email address), 'webhook'
-- (an http(s) URL) or 'apprise' (an Apprise URL); herald ignores other channels. Secrets never live
-- here: webhook signing secrets come from Airflow connections.
CREATE TABLE IF NOT EXISTS user_channels (
    user_id    bigint  NOT NULL,
    channel    text    NOT NULL,
    address    text    NOT NULL,
    enabled    boolean NOT NULL DEFAULT true,
    PRIMARY KEY (user_id, channel, address)
);
-- Added by herald (the contract allows adding columns): when a channel row appeared, so that
-- `herald verify` expects deliveries only for notifications made after it (missing_delivery.sql).
ALTER TABLE user_channels ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();

-- A preference may name one channel (NULL: every channel, the in-app notification included).
-- A row with a channel only decides that channel's deliveries; the in-app notification (and with it
-- every delivery) is decided by the channel-NULL rows alone, as before.
ALTER TABLE user_notification_preferences ADD COLUMN IF NOT EXISTS channel text;
ALTER TABLE user_notification_preferences DROP CONSTRAINT IF EXISTS user_notification_preferences_channel_check;
ALTER TABLE user_notification_preferences
    ADD CONSTRAINT user_notification_preferences_channel_check CHECK (channel IS NULL OR channel <> '');

-- The primary key (user_id, notification_type) allows one row per type and so cannot hold "no
-- price_drop emails" next to "price_drop enabled". It is replaced by a unique index over
-- (user_id, notification_type, coalesce(channel, '')): still one all-channels row per (user, type),
-- which every existing row is (they all get channel NULL), plus at most one row per named channel.
-- It starts with user_id, as the primary key did, so user_preferences.sql and the outbox's channel
-- preference probe (insert_notifications.sql, insert_digests.sql) read through it.
-- An application upsert names it as `ON CONFLICT (user_id, notification_type, coalesce(channel, ''))`.
-- The key is found by its columns, whatever the application named it.
DO $$
DECLARE
    pkey text;
BEGIN
    SELECT c.conname INTO pkey
    FROM pg_constraint c
    WHERE c.conrelid = 'user_notification_preferences'::regclass AND c.contype = 'p';
    IF pkey IS NOT NULL THEN
        EXECUTE format('ALTER TABLE user_notification_preferences DROP CONSTRAINT %I', pkey);
    END IF;
END
$$;
CREATE UNIQUE INDEX IF NOT EXISTS user_notification_preferences_key
    ON user_notification_preferences (user_id, notification_type, (coalesce(channel, '')));

-- herald's outbox: one row per notification x channel x address, written in the same statement as
-- the notification (insert_notifications.sql, insert_digests.sql), sent by the notification_delivery
-- DAG at least once, recorded exactly once. No foreign key to notifications: the application owns
-- the inbox and may delete rows; a delivery whose notification is gone ends 'failed' with that reason.
CREATE TABLE IF NOT EXISTS notification_deliveries (
    id                  bigserial PRIMARY KEY,
    notification_id     bigint      NOT NULL,
    user_id             bigint      NOT NULL,
    channel             text        NOT NULL CHECK (channel IN ('email', 'webhook', 'apprise')),
    address             text        NOT NULL,
    priority            text        NOT NULL DEFAULT 'normal' CHECK (priority IN ('normal', 'urgent')),
    status              text        NOT NULL DEFAULT 'pending'
                                    CHECK (status IN ('pending', 'sent', 'failed', 'disabled')),
    -- sends started (counted before each send, committed on its own: a send that crashed counts too)
    attempts            integer     NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by          text,
    claim_batch         integer,
    claim_expires_at    timestamptz,
    last_error          text,
    sent_at             timestamptz,
    -- the id the receiver sees on every try: the Message-ID of an email, the webhook-id of a webhook
    provider_message_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The outbox's ON CONFLICT target (one delivery per notification x channel x address whatever
-- happens), and verify/missing_deliveries.sql's probe per notification.
CREATE UNIQUE INDEX IF NOT EXISTS notification_deliveries_key
    ON notification_deliveries (notification_id, channel, address);

-- deliveries/claim_due.sql: "pending and due, urgent first, then the longest waiting", LIMIT n
-- FOR UPDATE SKIP LOCKED. Partial: the pending set stays small however many were sent.
-- Also stats_deliveries_pending.sql and verify/overdue_deliveries.sql.
CREATE INDEX IF NOT EXISTS notification_deliveries_due_idx
    ON notification_deliveries ((priority <> 'urgent'), next_attempt_at)
    WHERE status = 'pending';

-- deliveries/begin_chunk.sql, load_chunk.sql, release.sql: a send task's rows under its run and
-- batch. Partial: a recorded delivery drops its claim, so only claimed rows are in it.
CREATE INDEX IF NOT EXISTS notification_deliveries_claim_idx
    ON notification_deliveries (claimed_by, claim_batch)
    WHERE claimed_by IS NOT NULL;

-- deliveries/redrive_failed.sql (redeliver_failed) and stats_delivery_failures.sql (the reasons).
CREATE INDEX IF NOT EXISTS notification_deliveries_failed_idx
    ON notification_deliveries (channel, updated_at)
    WHERE status IN ('failed', 'disabled');

-- stats_deliveries_recent.sql (the last 24 hours by channel and status) and purge_old_deliveries.sql.
-- BRIN: rows arrive in created_at order; it costs an insert nothing (see notifications_created_brin).
CREATE INDEX IF NOT EXISTS notification_deliveries_created_brin
    ON notification_deliveries USING brin (created_at);
