-- Users with rate-limited outcomes not yet folded into a digest: how many, and the newest trigger id
-- (it names the digest, so a retried digest pass counts it once in the rate limiter).
-- Index: notification_outcomes_undigested_idx (user_id, trigger_id) WHERE outcome = 'rate_limited'.
SELECT user_id, count(*) AS held, max(trigger_id) AS last_trigger_id
FROM notification_outcomes
WHERE outcome = 'rate_limited'
GROUP BY user_id
ORDER BY user_id
LIMIT %(limit)s
