-- Housekeeping: clear claims whose lease ran out (their run died), so the queue shows them as plain
-- pending again; the next claim would take them over anyway. Index: pending_idx (partial).
UPDATE notification_triggers
SET claimed_by = NULL, claim_batch = NULL, claimed_at = NULL, claim_expires_at = NULL
WHERE status = 'pending' AND claim_expires_at < now()
RETURNING id
