-- Outcomes of the recipients that got no notification of their own (skipped, rate-limited, failed),
-- with their reason derived here from the outcome (so only ids and outcome words travel).
-- ON CONFLICT on the primary key (trigger_id, user_id): a retry records nothing twice. Returns what was
-- written per outcome (the batch reports that, not what it planned).
WITH written AS (
    INSERT INTO notification_outcomes (trigger_id, user_id, outcome, reason)
    SELECT o.trigger_id, o.user_id, o.outcome,
           CASE o.outcome WHEN 'rate_limited' THEN 'over the per-user rate limit'
                          WHEN 'failed' THEN format('user %%s does not exist', o.user_id) END
    FROM unnest(%(trigger_ids)s::bigint[], %(user_ids)s::bigint[], %(outcomes)s::text[])
         AS o(trigger_id, user_id, outcome)
    ON CONFLICT (trigger_id, user_id) DO NOTHING
    RETURNING outcome
)
SELECT outcome, count(*) FROM written GROUP BY outcome
