-- A manual run with redeliver_failed: failed deliveries go back to pending, due now, with a fresh
-- count of attempts (the operator asked for another try, e.g. after fixing the SMTP connection). Their
-- last error stays until a send records a new one. Disabled ones stay disabled (the endpoint is gone
-- or the user switched the channel off). Optional filter: only these channels.
-- Index: notification_deliveries_failed_idx (partial on failed and disabled).
UPDATE notification_deliveries
SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
WHERE status = 'failed'
  AND (%(channels)s::text[] IS NULL OR channel = ANY(%(channels)s::text[]))
RETURNING id
