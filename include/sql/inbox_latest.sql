-- The application's inbox: a user's latest notifications, newest first (keyset pagination: pass the
-- last seen (created_at, id) as %(before_created_at)s / %(before_id)s, or NULL for the first page).
-- Index: notifications_user_created_idx (user_id, created_at DESC, id DESC).
SELECT id, notification_type, title, body, payload, priority, created_at, read_at
FROM notifications
WHERE user_id = %(user_id)s
  AND (%(before_created_at)s::timestamptz IS NULL
       OR (created_at, id) < (%(before_created_at)s::timestamptz, %(before_id)s::bigint))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
