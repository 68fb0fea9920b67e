-- verify: finished triggers whose outcomes do not match what they promised. A 'done' trigger has
-- exactly recipient_count outcomes (a notification, or a row of notification_outcomes, per
-- recipient): fewer means a recipient was lost, more that one was recorded twice. A 'failed' trigger
-- failed as a whole and has none. Only triggers processed since %(since)s and inside the retention
-- period (housekeeping purges old outcome rows). Indexes: notification_triggers_processed_idx, then per
-- trigger notifications_trigger_user_key and the primary key of notification_outcomes.
SELECT t.id, t.status, t.recipient_count, n.c + o.c AS outcomes
FROM notification_triggers t
CROSS JOIN LATERAL (SELECT count(*) AS c FROM notifications WHERE trigger_id = t.id) n
CROSS JOIN LATERAL (SELECT count(*) AS c FROM notification_outcomes WHERE trigger_id = t.id) o
WHERE t.processed_at >= greatest(%(since)s::timestamptz,
                                 now() - make_interval(days => %(retention_days)s) + interval '1 hour')
  AND t.status IN ('done', 'failed')
  AND n.c + o.c <> CASE WHEN t.status = 'done' THEN coalesce(t.recipient_count, -1) ELSE 0 END
ORDER BY t.id
LIMIT %(limit)s
