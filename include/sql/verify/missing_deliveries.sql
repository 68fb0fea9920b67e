-- verify: notifications herald wrote since %(since)s (a trigger's, or a digest) whose user had an
-- enabled channel address at the time, not disabled for the type by a channel preference (none counts
-- for a bypass_preferences type), with no delivery row: the outbox lost one. Only notifications made
-- after migration 0005 (the outbox) and after the channel row appeared (user_channels.created_at).
-- A preference or channel changed after the notification can make it speak: the detail says which.
-- Indexes: notifications_created_brin, user_channels primary key (user_id, ...),
-- user_notification_preferences_key, notification_deliveries_key.
SELECT n.id, n.user_id, c.channel
FROM notifications n
JOIN user_channels c ON c.user_id = n.user_id
LEFT JOIN notification_templates tpl ON tpl.trigger_type = n.notification_type
WHERE n.created_at >= greatest(%(since)s::timestamptz,
                               (SELECT applied_at FROM herald_schema_migrations WHERE version = '0005_channels'))
  AND (n.trigger_id IS NOT NULL OR n.notification_type = 'digest')
  AND c.enabled AND c.channel IN ('email', 'webhook', 'apprise')
  AND c.created_at <= n.created_at
  AND (coalesce(tpl.bypass_preferences, false) OR NOT EXISTS (
        SELECT 1 FROM user_notification_preferences p
        WHERE p.user_id = n.user_id AND p.notification_type = n.notification_type
          AND coalesce(p.channel, '') = c.channel AND NOT p.enabled))
  AND NOT EXISTS (
        SELECT 1 FROM notification_deliveries d
        WHERE d.notification_id = n.id AND d.channel = c.channel AND d.address = c.address)
ORDER BY n.id, c.channel
LIMIT %(limit)s
