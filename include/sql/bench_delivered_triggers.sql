-- herald bench --latency: which of these triggers have a notification yet.
-- Index: notifications_trigger_user_key.
SELECT DISTINCT trigger_id FROM notifications WHERE trigger_id = ANY(%(ids)s::bigint[])
