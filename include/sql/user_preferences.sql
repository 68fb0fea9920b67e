-- For each of these users who exists: the notification types they disabled in-app (no row = enabled).
-- Only rows without a channel count: they decide the in-app notification (and so every channel);
-- a row naming a channel decides only that channel's deliveries (insert_notifications.sql), so the
-- Redis cache of these values (cache.py) holds in-app preferences only.
-- A user id missing from the result does not exist. Indexes: users primary key, and
-- user_notification_preferences_key (user_id, notification_type, coalesce(channel, '')).
SELECT u.id,
       coalesce(array_agg(p.notification_type ORDER BY p.notification_type)
                FILTER (WHERE p.enabled = false), '{}') AS disabled
FROM unnest(%(user_ids)s::bigint[]) AS q(id)
JOIN users u ON u.id = q.id
LEFT JOIN user_notification_preferences p ON p.user_id = u.id AND p.enabled = false AND p.channel IS NULL
GROUP BY u.id
