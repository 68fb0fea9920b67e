-- Reference digest pass: the users with rate-limited outcomes not yet folded into a digest.
-- Index: notification_outcomes_undigested_idx.
SELECT DISTINCT user_id
FROM notification_outcomes
WHERE outcome = 'rate_limited'
ORDER BY user_id
