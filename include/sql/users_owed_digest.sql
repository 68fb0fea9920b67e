-- The next users (by id, after %(after)s) with rate-limited outcomes not yet folded into a digest: a
-- digest pass walks all of them in chunks, so no user is starved by a cap on one pass.
-- Index: notification_outcomes_undigested_idx (user_id, trigger_id) WHERE outcome = 'rate_limited'.
SELECT DISTINCT user_id
FROM notification_outcomes
WHERE outcome = 'rate_limited' AND user_id > %(after)s
ORDER BY user_id
LIMIT %(limit)s
