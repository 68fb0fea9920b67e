-- Notifications each user received in the rate-limit window (normal, urgent and digests all count).
-- Index: notifications_user_created_idx (user_id, created_at DESC, id DESC), index-only range scan.
SELECT n.user_id, count(*) AS recent
FROM notifications n
WHERE n.user_id = ANY(%(user_ids)s::bigint[])
  AND n.created_at > now() - make_interval(secs => %(window_seconds)s)
GROUP BY n.user_id
