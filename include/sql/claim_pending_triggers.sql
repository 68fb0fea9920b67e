-- Claim up to %(limit)s pending triggers for run %(claim_id)s: urgent first, then oldest.
-- Index: notification_triggers_pending_idx ((priority <> 'urgent'), id) WHERE status = 'pending'.
-- FOR UPDATE SKIP LOCKED: two runs claiming at once never take the same trigger, and a trigger whose
-- batch is working right now (its rows are locked) is never taken, whatever its lease says; an expired
-- claim of a run that died is taken over. Claiming is not an attempt: `attempts` counts processing
-- starts (begin_batch.sql), so triggers released unprocessed (a bounded slice) never turn into poison.
-- Optional filters: only urgent, only triggers concerning user ids.
WITH picked AS (
    SELECT t.id
    FROM notification_triggers t
    WHERE t.status = 'pending'
      AND (t.claim_expires_at IS NULL OR t.claim_expires_at < now())
      AND (NOT %(only_urgent)s OR t.priority = 'urgent')
      AND (
          %(user_ids)s::bigint[] IS NULL
          OR t.user_id = ANY(%(user_ids)s::bigint[])
          OR (t.user_id IS NULL AND (t.entity_type, t.entity_id) IN (
                SELECT f.entity_type, f.entity_id FROM user_favorites f
                WHERE f.user_id = ANY(%(user_ids)s::bigint[])))
      )
    ORDER BY (t.priority <> 'urgent'), t.id
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE notification_triggers t
SET claimed_by = %(claim_id)s,
    claim_batch = NULL,
    claimed_at = now(),
    claim_expires_at = now() + make_interval(secs => %(lease_seconds)s)
FROM picked
WHERE t.id = picked.id
RETURNING t.id, t.priority, t.user_id, t.entity_type, t.entity_id, t.attempts
