-- Claim up to %(limit)s due deliveries for run %(claim_id)s: pending, due (next_attempt_at), not held
-- by a live claim; urgent first, then the longest waiting. FOR UPDATE SKIP LOCKED: two runs never take
-- the same delivery, and rows a send task is working on (locked) are never taken, whatever their
-- lease says; an expired claim of a run that died is taken over.
-- The claimed rows are cut into batches, one send task each: by priority and channel, at most
-- %(batch_size)s deliveries per batch, numbered urgent first. Returns one row per batch.
-- Optional filter: only these channels. Index: notification_deliveries_due_idx.
WITH picked AS (
    SELECT d.id, d.priority, d.channel
    FROM notification_deliveries d
    WHERE d.status = 'pending'
      AND d.next_attempt_at <= now()
      AND (d.claim_expires_at IS NULL OR d.claim_expires_at < now())
      AND (%(channels)s::text[] IS NULL OR d.channel = ANY(%(channels)s::text[]))
    ORDER BY (d.priority <> 'urgent'), d.next_attempt_at, d.id
    LIMIT %(limit)s
    FOR UPDATE OF d SKIP LOCKED
), parts AS (
    SELECT id, priority, channel,
           (row_number() OVER (PARTITION BY priority, channel ORDER BY id) - 1) / %(batch_size)s AS part
    FROM picked
), numbered AS (
    SELECT id, (dense_rank() OVER (ORDER BY (priority <> 'urgent'), channel, part) - 1)::int AS batch
    FROM parts
), claimed AS (
    UPDATE notification_deliveries d
    SET claimed_by = %(claim_id)s,
        claim_batch = n.batch,
        claim_expires_at = now() + make_interval(secs => %(lease_seconds)s)
    FROM numbered n
    WHERE d.id = n.id
    RETURNING d.claim_batch, d.priority, d.channel
)
SELECT claim_batch, priority, channel, count(*)::int AS deliveries
FROM claimed
GROUP BY claim_batch, priority, channel
ORDER BY claim_batch
