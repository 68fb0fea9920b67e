-- Backfill: re-drive the triggers created in [%(start)s, %(end)s) that ended 'failed' or were never
-- processed, for run %(claim_id)s. They go back to 'pending' under this run's claim with a fresh count
-- of attempts (the operator asked for another try); a failed trigger has no outcome rows (it failed as
-- a whole), and notifications are unique per (trigger_id, user_id), so nothing can be duplicated.
-- Indexes: notification_triggers_failed_idx (created_at) WHERE status = 'failed', and
-- notification_triggers_pending_idx for the pending ones.
WITH picked AS (
    SELECT t.id
    FROM notification_triggers t
    WHERE t.created_at >= %(start)s AND t.created_at < %(end)s
      AND (t.status = 'failed'
           OR (t.status = 'pending' AND (t.claim_expires_at IS NULL OR t.claim_expires_at < now())))
      AND (NOT %(only_urgent)s OR t.priority = 'urgent')
      AND (%(user_ids)s::bigint[] IS NULL OR t.user_id = ANY(%(user_ids)s::bigint[]))
    ORDER BY (t.priority <> 'urgent'), t.id
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE notification_triggers t
SET status = 'pending',
    last_error = NULL,
    processed_at = NULL,
    claimed_by = %(claim_id)s,
    claim_batch = NULL,
    claimed_at = now(),
    claim_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    attempts = 0
FROM picked
WHERE t.id = picked.id
RETURNING t.id, t.priority, t.user_id, t.entity_type, t.entity_id, t.attempts
