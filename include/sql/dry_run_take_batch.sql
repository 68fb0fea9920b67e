-- Dry run: inside a transaction that is always rolled back, give the batch's triggers (recorded by the
-- dry run's claim, itself rolled back) this run's claim and batch number, and make the failed ones of
-- a backfill pending again as its claim would, so the batch is computed by exactly the statements of
-- a real one. Triggers another run holds now are left out (SKIP LOCKED, live lease).
-- Index: primary key.
WITH picked AS (
    SELECT id FROM notification_triggers
    WHERE id = ANY(%(ids)s::bigint[])
      AND (status = 'failed'
           OR (status = 'pending' AND (claim_expires_at IS NULL OR claim_expires_at < now())))
    FOR UPDATE SKIP LOCKED
)
UPDATE notification_triggers t
SET claimed_by = %(claim_id)s, claim_batch = %(batch)s, status = 'pending', last_error = NULL
FROM picked
WHERE t.id = picked.id
