-- verify: notifications herald wrote since %(since)s (a trigger's, or a digest) whose user had an
-- enabled channel address at the time, not disabled for the type by a channel preference (none counts
-- for a bypass_preferences type), with no delivery row: the outbox lost one. The caller moves
-- %(since)s after migration 0005 (the outbox) was applied; only channel rows that existed when the
-- notification was made (user_channels.created_at) count. A preference or channel changed after the
-- notification can make it speak: the detail says so.
-- The notifications since then are read first (MATERIALIZED: through notifications_created_brin, not
-- a walk of the whole table in id order), then per row: user_channels primary key (user_id, ...),
-- notification_deliveries_key, user_notification_preferences_key.
WITH recent AS MATERIALIZED (
    SELECT id, user_id, notification_type, created_at
    FROM notifications
    WHERE created_at >= %(since)s AND (trigger_id IS NOT NULL OR notification_type = 'digest')
)
SELECT n.id, n.user_id, c.channel
FROM recent n
JOIN user_channels c ON c.user_id = n.user_id
LEFT JOIN notification_templates tpl ON tpl.trigger_type = n.notification_type
WHERE c.enabled AND c.channel IN ('email', 'webhook', 'apprise')
  AND c.created_at <= n.created_at
  AND NOT EXISTS (
        SELECT 1 FROM user_notification_preferences p
        WHERE p.user_id = n.user_id AND p.notification_type = n.notification_type
          AND coalesce(p.channel, '') = c.channel AND NOT p.enabled
          AND NOT coalesce(tpl.bypass_preferences, false))
  AND NOT EXISTS (
        SELECT 1 FROM notification_deliveries d
        WHERE d.notification_id = n.id AND d.channel = c.channel AND d.address = c.address)
ORDER BY n.id, c.channel
LIMIT %(limit)s
