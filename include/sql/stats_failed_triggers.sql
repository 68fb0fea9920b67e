-- herald.stats.failed_triggers: the latest failed triggers with their reasons, newest first, through
-- notification_triggers_failed_idx (0002; partial on status = 'failed', ordered by created_at).
-- Ids, types and reasons only: never the payload or any user data.
SELECT
    id,
    trigger_type,
    priority,
    created_at,
    processed_at,
    attempts,
    claimed_by             AS run_id,
    left(last_error, 1000) AS last_error
FROM notification_triggers
WHERE status = 'failed'
ORDER BY created_at DESC
LIMIT %(limit)s
