-- Reference processor: every pending trigger nobody else holds a live claim on, in processing order
-- (urgent first, then normal, each by ascending id). Index: notification_triggers_pending_idx.
SELECT id
FROM notification_triggers
WHERE status = 'pending'
  AND NOT (claimed_by IS NOT NULL AND claim_expires_at > now())
ORDER BY (priority <> 'urgent'), id
