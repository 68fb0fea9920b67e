-- Outcomes of the recipients that got no notification of their own (skipped, rate-limited, failed).
-- ON CONFLICT on the primary key (trigger_id, user_id): a retry records nothing twice. RETURNING: the
-- batch counts what it wrote.
INSERT INTO notification_outcomes (trigger_id, user_id, outcome, reason)
SELECT * FROM unnest(%(trigger_ids)s::bigint[], %(user_ids)s::bigint[], %(outcomes)s::text[], %(reasons)s::text[])
ON CONFLICT (trigger_id, user_id) DO NOTHING
RETURNING outcome
