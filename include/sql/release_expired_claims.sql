-- Housekeeping: clear claims whose lease ran out (their run died), so the queue shows them as plain
-- pending again; the next claim would take them over anyway. SKIP LOCKED: rows a batch is working on
-- are its own until it commits, whatever the lease says. Index: pending_idx (partial).
UPDATE notification_triggers t
SET claimed_by = NULL, claim_batch = NULL, claimed_at = NULL, claim_expires_at = NULL
FROM (
    SELECT id FROM notification_triggers
    WHERE status = 'pending' AND claim_expires_at < now()
    FOR UPDATE SKIP LOCKED
) AS expired
WHERE t.id = expired.id
RETURNING t.id
