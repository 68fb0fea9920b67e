-- verify: (trigger, user) pairs with more than one outcome. Each table is unique on the pair by
-- itself (notifications_trigger_user_key, the primary key of notification_outcomes), so a second
-- outcome can only be a notification AND an outcome row for the same pair (e.g. delivered and
-- rate_limited). Either of the two written since %(since)s, then one probe of the other table's unique
-- index per row (LATERAL ... LIMIT 1 keeps it a probe however the tables' sizes compare).
-- Indexes: notification_outcomes_created_idx, notifications_created_brin, then the unique indexes.
SELECT trigger_id, user_id
FROM (
    SELECT o.trigger_id, o.user_id
    FROM notification_outcomes o
    CROSS JOIN LATERAL (SELECT 1 FROM notifications n
                        WHERE n.trigger_id = o.trigger_id AND n.user_id = o.user_id LIMIT 1) AS hit
    WHERE o.created_at >= %(since)s
    UNION
    SELECT n.trigger_id, n.user_id
    FROM notifications n
    CROSS JOIN LATERAL (SELECT 1 FROM notification_outcomes o
                        WHERE o.trigger_id = n.trigger_id AND o.user_id = n.user_id LIMIT 1) AS hit
    WHERE n.created_at >= %(since)s AND n.trigger_id IS NOT NULL
) AS d
ORDER BY trigger_id, user_id
LIMIT %(limit)s
