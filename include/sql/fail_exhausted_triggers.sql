-- Poison protection: a trigger whose processing started max_attempts times without finishing (its
-- batch crashed or was killed each time) is failed with a reason instead of blocking the queue.
-- Only unheld ones: a live lease, or rows a batch holds locked right now (SKIP LOCKED), are left alone.
-- Index: pending_idx (partial).
UPDATE notification_triggers t
SET status = 'failed',
    processed_at = now(),
    claim_expires_at = NULL,
    last_error = format('gave up after %%s attempts: its batch never finished', t.attempts)
FROM (
    SELECT id FROM notification_triggers
    WHERE status = 'pending'
      AND attempts >= %(max_attempts)s
      AND (claim_expires_at IS NULL OR claim_expires_at < now())
    FOR UPDATE SKIP LOCKED
) AS exhausted
WHERE t.id = exhausted.id
RETURNING t.id
