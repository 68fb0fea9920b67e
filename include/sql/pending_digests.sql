-- For these users: how many rate-limited outcomes wait for a digest, and the newest trigger id among
-- them (what the digest folds). Read under lock_rate_limit_buckets.sql: no batch can add a held
-- outcome for these users until the digest commits, so the count is exactly what mark_digested folds.
-- Index: notification_outcomes_undigested_idx (user_id, trigger_id) WHERE outcome = 'rate_limited'.
SELECT user_id, count(*) AS held, max(trigger_id) AS last_trigger_id
FROM notification_outcomes
WHERE outcome = 'rate_limited' AND user_id = ANY(%(user_ids)s::bigint[])
GROUP BY user_id
ORDER BY user_id
