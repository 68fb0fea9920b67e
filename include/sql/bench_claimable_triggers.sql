-- herald bench: pending triggers a new run could still claim (the core loops run_once until none are left).
SELECT count(*)
FROM notification_triggers
WHERE status = 'pending'
  AND (claim_expires_at IS NULL OR claim_expires_at < now())
