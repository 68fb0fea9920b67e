-- Write a batch's notifications: one row per (trigger, user), rendered title/body per trigger.
-- ON CONFLICT on notifications_trigger_user_key: at most one notification per (trigger, user) whatever
-- happens; the row count is what was written (the batch reports that, not what it planned).
INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, payload, priority)
SELECT r.user_id, t.id, t.trigger_type, m.title, m.body, t.payload,
       CASE WHEN t.priority = 'urgent' THEN 'urgent' ELSE 'normal' END
FROM unnest(%(trigger_ids)s::bigint[], %(user_ids)s::bigint[]) AS r(trigger_id, user_id)
JOIN unnest(%(msg_trigger_ids)s::bigint[], %(titles)s::text[], %(bodies)s::text[])
     AS m(trigger_id, title, body) ON m.trigger_id = r.trigger_id
JOIN notification_triggers t ON t.id = r.trigger_id
ON CONFLICT (trigger_id, user_id) DO NOTHING
