-- Give back claims this run holds but did not finish (a batch that failed for good, or triggers that
-- did not fit in the run's bounded slice), so the next run takes them at once. Index: claim_idx.
UPDATE notification_triggers
SET claimed_by = NULL, claim_batch = NULL, claimed_at = NULL, claim_expires_at = NULL
WHERE claimed_by = %(claim_id)s
  AND status = 'pending'
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
RETURNING id
