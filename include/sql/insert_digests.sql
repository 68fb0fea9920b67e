-- One digest notification per user (trigger_id NULL: it summarises many triggers), and in the same
-- statement its deliveries (the outbox, as insert_notifications.sql): one per enabled channel address
-- of the user that no channel preference for type 'digest' disables. Returns each digest's id and
-- user, and on every row the number of deliveries written.
-- Indexes: user_channels primary key, user_notification_preferences_key.
WITH inserted AS (
    INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, payload, priority)
    SELECT d.user_id, NULL, 'digest',
           format('%%s more updates on your favorites', d.held),
           format('You have %%s more updates that were held back so you are not flooded.', d.held),
           jsonb_build_object('held', d.held, 'through_trigger_id', d.last_trigger_id),
           'normal'
    FROM unnest(%(user_ids)s::bigint[], %(held)s::int[], %(last_trigger_ids)s::bigint[])
         AS d(user_id, held, last_trigger_id)
    RETURNING id, user_id, notification_type, priority
), deliveries AS (
    INSERT INTO notification_deliveries (notification_id, user_id, channel, address, priority)
    SELECT n.id, n.user_id, c.channel, c.address, n.priority
    FROM inserted n
    JOIN user_channels c ON c.user_id = n.user_id
    WHERE c.enabled AND c.channel IN ('email', 'webhook', 'apprise')
      AND NOT EXISTS (
            SELECT 1 FROM user_notification_preferences p
            WHERE p.user_id = n.user_id AND p.notification_type = n.notification_type
              AND coalesce(p.channel, '') = c.channel AND NOT p.enabled)
    ON CONFLICT (notification_id, channel, address) DO NOTHING
    RETURNING 1
)
SELECT id, user_id, (SELECT count(*) FROM deliveries) AS deliveries
FROM inserted
