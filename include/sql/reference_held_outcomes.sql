-- Reference digest pass: one user's rate-limited outcomes, locked until the digest commits.
-- Index: notification_outcomes_undigested_idx.
SELECT trigger_id
FROM notification_outcomes
WHERE user_id = %(user_id)s AND outcome = 'rate_limited'
ORDER BY trigger_id
FOR UPDATE
