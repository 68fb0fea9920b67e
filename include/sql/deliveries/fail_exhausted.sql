-- Poison protection: a delivery whose send started %(max_attempts)s times without an answer being
-- recorded (its send task crashed or was killed each time) is failed with a reason instead of being
-- sent forever. Only unheld ones: a live lease, or rows a send task holds locked (SKIP LOCKED), are
-- left alone. Index: notification_deliveries_due_idx (partial on pending).
UPDATE notification_deliveries d
SET status = 'failed',
    last_error = format('gave up after %%s attempts: its send never finished; last error: %%s',
                        d.attempts, coalesce(d.last_error, 'none')),
    claimed_by = NULL, claim_batch = NULL, claim_expires_at = NULL, updated_at = now()
FROM (
    SELECT id FROM notification_deliveries
    WHERE status = 'pending'
      AND attempts >= %(max_attempts)s
      AND (claim_expires_at IS NULL OR claim_expires_at < now())
    FOR UPDATE SKIP LOCKED
) AS exhausted
WHERE d.id = exhausted.id
RETURNING d.id, d.channel
