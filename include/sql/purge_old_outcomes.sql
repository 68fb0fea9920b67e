-- Housekeeping: drop outcome records older than the retention period, a bounded chunk per call.
-- Index: notification_outcomes_created_idx. Digested outcomes keep their digest notification.
DELETE FROM notification_outcomes
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM notification_outcomes
    WHERE created_at < now() - make_interval(days => %(retention_days)s)
    LIMIT %(chunk)s))
