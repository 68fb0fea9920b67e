-- Indexes for `herald verify` (herald/verify.py), which checks the invariants on a live database and
-- must stay cheap enough to run after every test scenario and from housekeeping.

-- verify_trigger_outcome_counts.sql: finished triggers processed since a moment.
CREATE INDEX IF NOT EXISTS notification_triggers_processed_idx
    ON notification_triggers (processed_at)
    WHERE processed_at IS NOT NULL;

-- verify_users_over_limit.sql: the notifications created since a moment. BRIN, not btree: rows arrive
-- in created_at order, so a few hundred bytes of summary per 128 pages cover it, and an insert costs
-- nothing (new pages are summarised by vacuum); a btree here would slow down every batch's insert.
CREATE INDEX IF NOT EXISTS notifications_created_brin
    ON notifications USING brin (created_at);
