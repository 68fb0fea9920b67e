-- Write a batch's notifications: one row per (trigger, user), rendered title/body per trigger, and in
-- the same statement their deliveries (the outbox): one per enabled channel address of the user
-- (user_channels) that a channel preference does not disable for the type (bypass_preferences types
-- ignore them, as they ignore in-app preferences). So a notification and its deliveries are written
-- together or not at all, and only for notifications this statement wrote.
-- ON CONFLICT on notifications_trigger_user_key: at most one notification per (trigger, user) whatever
-- happens; on notification_deliveries_key likewise. Returns what was written (the batch reports that,
-- not what it planned): the notifications, and the deliveries per channel.
-- Indexes: user_channels primary key (user_id, ...) and user_notification_preferences_key (user_id,
-- notification_type, ...) per written notification; notification_templates primary key.
WITH inserted AS (
    INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, payload, priority)
    SELECT r.user_id, t.id, t.trigger_type, m.title, m.body, t.payload,
           CASE WHEN t.priority = 'urgent' THEN 'urgent' ELSE 'normal' END
    FROM unnest(%(trigger_ids)s::bigint[], %(user_ids)s::bigint[]) AS r(trigger_id, user_id)
    JOIN unnest(%(msg_trigger_ids)s::bigint[], %(titles)s::text[], %(bodies)s::text[])
         AS m(trigger_id, title, body) ON m.trigger_id = r.trigger_id
    JOIN notification_triggers t ON t.id = r.trigger_id
    ON CONFLICT (trigger_id, user_id) DO NOTHING
    RETURNING id, user_id, notification_type, priority
), deliveries AS (
    INSERT INTO notification_deliveries (notification_id, user_id, channel, address, priority)
    SELECT n.id, n.user_id, c.channel, c.address, n.priority
    FROM inserted n
    JOIN user_channels c ON c.user_id = n.user_id
    LEFT JOIN notification_templates tpl ON tpl.trigger_type = n.notification_type
    WHERE c.enabled AND c.channel IN ('email', 'webhook', 'apprise')
      AND (coalesce(tpl.bypass_preferences, false) OR NOT EXISTS (
            SELECT 1 FROM user_notification_preferences p
            WHERE p.user_id = n.user_id AND p.notification_type = n.notification_type
              AND coalesce(p.channel, '') = c.channel AND NOT p.enabled))
    ON CONFLICT (notification_id, channel, address) DO NOTHING
    RETURNING channel
)
SELECT (SELECT count(*) FROM inserted) AS notifications,
       (SELECT coalesce(jsonb_object_agg(channel, n), '{}'::jsonb)
        FROM (SELECT channel, count(*) AS n FROM deliveries GROUP BY channel) d) AS deliveries
