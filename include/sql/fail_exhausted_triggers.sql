-- Poison protection: a trigger claimed max_attempts times without finishing (its batch crashed each
-- time) is failed with a reason instead of blocking the queue. Index: pending_idx (partial).
UPDATE notification_triggers
SET status = 'failed',
    processed_at = now(),
    last_error = format('gave up after %%s attempts: its batch never finished', attempts)
WHERE status = 'pending'
  AND attempts >= %(max_attempts)s
  AND (claim_expires_at IS NULL OR claim_expires_at < now())
RETURNING id
