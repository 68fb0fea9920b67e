-- For each of these users who exists: the notification types they disabled (no row = enabled).
-- A user id missing from the result does not exist. Indexes: users primary key, and the primary key
-- (user_id, notification_type) of user_notification_preferences.
SELECT u.id,
       coalesce(array_agg(p.notification_type ORDER BY p.notification_type)
                FILTER (WHERE p.enabled = false), '{}') AS disabled
FROM unnest(%(user_ids)s::bigint[]) AS q(id)
JOIN users u ON u.id = q.id
LEFT JOIN user_notification_preferences p ON p.user_id = u.id AND p.enabled = false
GROUP BY u.id
