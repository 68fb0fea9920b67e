-- The application's unread badge. Index: notifications_unread_idx (user_id) WHERE read_at IS NULL.
SELECT count(*) FROM notifications WHERE user_id = %(user_id)s AND read_at IS NULL
