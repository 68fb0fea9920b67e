-- verify: deliveries due for more than %(grace_seconds)s and claimed by nobody: notification_delivery
-- (every minute) is not running, or not keeping up. Nothing owed may wait unseen.
-- Index: notification_deliveries_due_idx (partial on pending).
SELECT id, channel, next_attempt_at, attempts
FROM notification_deliveries
WHERE status = 'pending'
  AND next_attempt_at < now() - make_interval(secs => %(grace_seconds)s)
  AND (claim_expires_at IS NULL OR claim_expires_at < now())
ORDER BY (priority <> 'urgent'), next_attempt_at
LIMIT %(limit)s
