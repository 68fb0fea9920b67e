-- Give back deliveries a run claimed but did not send (a send task that failed for good, or stopped
-- because its channel was down), so the next run takes them at once; their next_attempt_at is left as
-- it is. Not the rows a send task holds right now (SKIP LOCKED). Optional: only one batch.
-- Index: notification_deliveries_claim_idx.
UPDATE notification_deliveries d
SET claimed_by = NULL, claim_batch = NULL, claim_expires_at = NULL, updated_at = now()
FROM (
    SELECT id FROM notification_deliveries
    WHERE claimed_by = %(claim_id)s AND status = 'pending'
      AND (%(batch)s::int IS NULL OR claim_batch = %(batch)s::int)
    FOR UPDATE SKIP LOCKED
) AS held
WHERE d.id = held.id
RETURNING d.id
