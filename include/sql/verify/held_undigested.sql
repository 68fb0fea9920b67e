-- verify: held notifications (rate_limited outcomes) older than the window plus %(grace_seconds)s whose
-- user is under the limit now: owed, payable, and still not paid by a digest pass (finalize sends
-- digests every run, housekeeping every hour). Index: notification_outcomes_undigested_idx (partial),
-- then notifications_user_created_idx for the user's window.
WITH owed AS (
    SELECT user_id, count(*) AS held, min(created_at) AS oldest
    FROM notification_outcomes
    WHERE outcome = 'rate_limited'
    GROUP BY user_id
)
SELECT o.user_id, o.held, o.oldest
FROM owed o
WHERE o.oldest < now() - make_interval(secs => %(window_seconds)s + %(grace_seconds)s)
  AND (SELECT count(*) FROM notifications n
       WHERE n.user_id = o.user_id
         AND n.created_at > now() - make_interval(secs => %(window_seconds)s)) < %(rate_limit)s
ORDER BY o.user_id
LIMIT %(limit)s
