-- A send task starts on its next chunk: up to %(limit)s of its run's pending deliveries under its
-- batch number count an attempt and renew their lease, in a transaction of their own that commits
-- before anything is sent. So a send that crashes or is killed still counts (poison protection), and
-- the lease runs from the chunk's start. SKIP LOCKED: rows another process of the same batch holds
-- (an earlier try still running) are left to it. Index: notification_deliveries_claim_idx.
UPDATE notification_deliveries d
SET attempts = d.attempts + 1,
    claim_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    updated_at = now()
FROM (
    SELECT id FROM notification_deliveries
    WHERE claimed_by = %(claim_id)s AND claim_batch = %(batch)s AND status = 'pending'
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) AS chunk
WHERE d.id = chunk.id
RETURNING d.id
