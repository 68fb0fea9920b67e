-- Housekeeping: drop delivery records older than the retention period, a bounded chunk per call.
-- Never a pending one: that is a delivery still owed. Index: notification_deliveries_created_brin.
DELETE FROM notification_deliveries
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM notification_deliveries
    WHERE created_at < now() - make_interval(days => %(retention_days)s)
      AND status <> 'pending'
    LIMIT %(chunk)s))
