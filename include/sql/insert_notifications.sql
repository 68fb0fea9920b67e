-- Write a batch's notifications: one row per (trigger, user), rendered title/body per trigger.
-- ON CONFLICT on notifications_trigger_user_key makes a retry, rerun or overlapping run a no-op.
INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, payload, priority)
SELECT r.user_id, t.id, t.trigger_type, m.title, m.body, t.payload, t.priority
FROM unnest(%(trigger_ids)s::bigint[], %(user_ids)s::bigint[]) AS r(trigger_id, user_id)
JOIN unnest(%(msg_trigger_ids)s::bigint[], %(titles)s::text[], %(bodies)s::text[])
     AS m(trigger_id, title, body) ON m.trigger_id = r.trigger_id
JOIN notification_triggers t ON t.id = r.trigger_id
ON CONFLICT (trigger_id, user_id) DO NOTHING
