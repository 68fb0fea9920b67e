-- The urgent lane's wake-up signal (herald/urgent.py, dags/notification_urgent.py).
-- A wake-up only: notification_triggers stays the truth, and the two-minute run the safety net, so a
-- lost signal delays an urgent trigger to the next check but never loses it.

-- NOTIFY herald_urgent when a statement inserts urgent triggers: once per statement, whatever its row
-- count (a transition table, not a per-row trigger), delivered at commit (never for a rollback), and
-- PostgreSQL folds identical notifications of one transaction into one. The payload is empty: the
-- listener looks at the table.
CREATE OR REPLACE FUNCTION herald_notify_urgent_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM herald_new_triggers WHERE priority = 'urgent') THEN
        PERFORM pg_notify('herald_urgent', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS herald_notify_urgent_inserts ON notification_triggers;
CREATE TRIGGER herald_notify_urgent_inserts
    AFTER INSERT ON notification_triggers
    REFERENCING NEW TABLE AS herald_new_triggers
    FOR EACH STATEMENT EXECUTE FUNCTION herald_notify_urgent_inserts();

-- What the lane last woke up for (urgent_lane_due.sql): only urgent triggers newer than that, or
-- still waiting long after the last wake-up, wake it again. Without it, every re-armed listener would
-- fire again for triggers a woken run is about to claim, and empty runs would pile up.
CREATE TABLE IF NOT EXISTS herald_urgent_lane (
    lane              text PRIMARY KEY,
    signalled_through bigint      NOT NULL DEFAULT 0,
    signalled_at      timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO herald_urgent_lane (lane) VALUES ('urgent') ON CONFLICT DO NOTHING;
