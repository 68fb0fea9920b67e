-- Fold the rate-limited outcomes into their user's digest (the ones pending_digests.sql counted, under
-- the same locks); the caller checks that the row count equals the digests' "N more updates".
-- Index: undigested_idx.
UPDATE notification_outcomes o
SET outcome = 'digested', digest_id = d.digest_id
FROM unnest(%(user_ids)s::bigint[], %(digest_ids)s::bigint[], %(last_trigger_ids)s::bigint[])
     AS d(user_id, digest_id, last_trigger_id)
WHERE o.outcome = 'rate_limited' AND o.user_id = d.user_id AND o.trigger_id <= d.last_trigger_id
