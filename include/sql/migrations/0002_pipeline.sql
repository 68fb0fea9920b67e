-- What the pipeline adds to the contract tables, and its own tables.
-- Every index names the query (include/sql/*.sql) that uses it; tests/integration/test_explain.py
-- checks those plans on realistic volumes.

-- Claims. A claimed trigger stays status = 'pending' (the application's view does not change)
-- until it ends 'done' or 'failed'; claimed_by keeps the id of the run that finished it.
ALTER TABLE notification_triggers
    ADD COLUMN IF NOT EXISTS claimed_by       text,
    ADD COLUMN IF NOT EXISTS claim_batch      integer,
    ADD COLUMN IF NOT EXISTS claimed_at       timestamptz,
    ADD COLUMN IF NOT EXISTS claim_expires_at timestamptz,
    ADD COLUMN IF NOT EXISTS attempts         integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS recipient_count  integer;

-- claim_pending_triggers.sql: "pending, urgent first, then oldest", LIMIT n FOR UPDATE SKIP LOCKED.
-- Partial: the pending set stays small however many triggers are done; oldest_pending in stats.sql too.
CREATE INDEX IF NOT EXISTS notification_triggers_pending_idx
    ON notification_triggers ((priority <> 'urgent'), id)
    WHERE status = 'pending';

-- load_batch_triggers.sql (a mapped task loads its batch), release_run_claims.sql, run_trigger_counts.sql.
CREATE INDEX IF NOT EXISTS notification_triggers_claim_idx
    ON notification_triggers (claimed_by, claim_batch);

-- claim_failed_triggers.sql: a backfill re-drives the failed triggers created in its interval.
CREATE INDEX IF NOT EXISTS notification_triggers_failed_idx
    ON notification_triggers (created_at)
    WHERE status = 'failed';

-- fanout_recipients.sql and estimate_recipients.sql: everyone who favorited (entity_type, entity_id).
-- The primary key starts with user_id and cannot serve this.
CREATE INDEX IF NOT EXISTS user_favorites_entity_idx
    ON user_favorites (entity_type, entity_id, user_id);

-- insert_notifications.sql ON CONFLICT target: at most one notification per (trigger, user).
CREATE UNIQUE INDEX IF NOT EXISTS notifications_trigger_user_key
    ON notifications (trigger_id, user_id);

-- inbox_latest.sql (latest N for a user) and recent_notification_counts.sql (the rate-limit window).
CREATE INDEX IF NOT EXISTS notifications_user_created_idx
    ON notifications (user_id, created_at DESC, id DESC);

-- inbox_unread_count.sql: partial, so reading a notification removes it from the index.
CREATE INDEX IF NOT EXISTS notifications_unread_idx
    ON notifications (user_id)
    WHERE read_at IS NULL;

-- One outcome per (trigger, recipient) that did NOT get a notification of its own:
-- skipped_preference, rate_limited (later digested) or failed. A delivered recipient's outcome is its
-- notifications row; the view trigger_recipient_outcomes puts the two together, so "nothing lost" is
-- a query: every done trigger has recipient_count rows there.
CREATE TABLE IF NOT EXISTS notification_outcomes (
    trigger_id      bigint NOT NULL,
    user_id         bigint NOT NULL,
    outcome         text   NOT NULL CHECK (outcome IN ('skipped_preference', 'rate_limited', 'digested', 'failed')),
    reason          text,
    digest_id       bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger_id, user_id)
);

-- pending_digests.sql: rate-limited outcomes not yet folded into a digest, per user.
CREATE INDEX IF NOT EXISTS notification_outcomes_undigested_idx
    ON notification_outcomes (user_id, trigger_id)
    WHERE outcome = 'rate_limited';

-- stats.sql (outcomes in the last hour) and purge_old_outcomes.sql (housekeeping).
CREATE INDEX IF NOT EXISTS notification_outcomes_created_idx
    ON notification_outcomes (created_at);

CREATE OR REPLACE VIEW trigger_recipient_outcomes AS
    SELECT trigger_id, user_id, 'delivered'::text AS outcome, NULL::text AS reason, id AS notification_id, created_at
    FROM notifications
    WHERE trigger_id IS NOT NULL
    UNION ALL
    SELECT trigger_id, user_id, outcome, reason, digest_id, created_at
    FROM notification_outcomes;

-- Per-type templates (Jinja, rendered in a sandbox with the trigger's payload). Rows may be added or
-- updated by the application or an operator; 0003 seeds the built-in types.
CREATE TABLE IF NOT EXISTS notification_templates (
    trigger_type       text PRIMARY KEY,
    title_template     text    NOT NULL,
    body_template      text    NOT NULL,
    bypass_preferences boolean NOT NULL DEFAULT false,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- One row per DAG run (or CLI run): what it claimed, how its batches ended, how long it took.
CREATE TABLE IF NOT EXISTS herald_runs (
    run_id        text PRIMARY KEY,
    mode          text NOT NULL DEFAULT 'scheduled',
    dry_run       boolean NOT NULL DEFAULT false,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    triggers      integer NOT NULL DEFAULT 0,
    batches       jsonb   NOT NULL DEFAULT '[]',
    counts        jsonb   NOT NULL DEFAULT '{}',
    duration_seconds double precision
);

-- stats.sql (last runs, throughput per hour) and purge_old_runs.sql.
CREATE INDEX IF NOT EXISTS herald_runs_started_idx ON herald_runs (started_at);
