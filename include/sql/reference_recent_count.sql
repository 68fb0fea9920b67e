-- Reference processor: notifications one user received in the rate-limit window (normal, urgent and
-- digests all count). Index: notifications_user_created_idx.
SELECT count(*)
FROM notifications
WHERE user_id = %(user_id)s
  AND created_at > now() - make_interval(secs => %(window_seconds)s)
