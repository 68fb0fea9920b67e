-- Record a chunk's answers, one per delivery: 'sent', 'failed' (a permanent refusal), 'disabled' (the
-- endpoint is gone or the channel switched off) or 'retry' (pending again after %(delays)s seconds,
-- or 'failed' once it used its %(max_attempts)s attempts). The claim is dropped in every case. Only
-- while this run holds the row (it does: load_chunk.sql locked it); the caller checks the count.
-- Index: notification_deliveries_claim_idx (the run's rows), or the primary key.
UPDATE notification_deliveries d
SET status = CASE WHEN r.status <> 'retry' THEN r.status
                  WHEN d.attempts >= %(max_attempts)s THEN 'failed'
                  ELSE 'pending' END,
    last_error = CASE WHEN r.status = 'retry' AND d.attempts >= %(max_attempts)s
                      THEN format('gave up after %%s attempts: %%s', d.attempts, r.error)
                      ELSE coalesce(r.error, d.last_error) END,
    next_attempt_at = CASE WHEN r.status = 'retry' THEN now() + make_interval(secs => r.delay)
                           ELSE d.next_attempt_at END,
    sent_at = CASE WHEN r.status = 'sent' THEN now() ELSE d.sent_at END,
    provider_message_id = coalesce(r.message_id, d.provider_message_id),
    claimed_by = NULL, claim_batch = NULL, claim_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(errors)s::text[], %(message_ids)s::text[],
            %(delays)s::float8[]) AS r(id, status, error, message_id, delay)
WHERE d.id = r.id AND d.claimed_by = %(claim_id)s AND d.status = 'pending'
RETURNING d.status
