-- Housekeeping: drop outcome records older than the retention period, a bounded chunk per call.
-- Never a held one ('rate_limited'): that is a notification still owed to its user (its digest), and
-- purging it would lose it. Digested outcomes keep their digest notification.
-- Index: notification_outcomes_created_idx.
DELETE FROM notification_outcomes
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM notification_outcomes
    WHERE created_at < now() - make_interval(days => %(retention_days)s)
      AND outcome <> 'rate_limited'
    LIMIT %(chunk)s))
