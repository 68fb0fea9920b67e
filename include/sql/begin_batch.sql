-- A batch task starts on its triggers: count the attempt and renew the lease, in a transaction of its
-- own that commits before the work does, so a batch that crashes or is killed still counts one
-- attempt (poison protection), and the lease runs from the batch's start, not from the claim.
-- Only what this run still holds: a trigger another run took over (its lease ran out while this batch
-- waited for a pool slot) is not returned, and the batch leaves it alone. Index: claim_idx.
UPDATE notification_triggers
SET attempts = attempts + 1,
    claim_expires_at = now() + make_interval(secs => %(lease_seconds)s)
WHERE claimed_by = %(claim_id)s AND claim_batch = %(batch)s AND status = 'pending'
RETURNING id
