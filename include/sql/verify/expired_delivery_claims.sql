-- verify: deliveries still pending under a claim whose lease ran out more than %(grace_seconds)s ago:
-- a delivery run died and no later run took them over. Rows a send task holds right now are skipped
-- (SKIP LOCKED: its lock, not its lease, protects them). Index: notification_deliveries_claim_idx.
SELECT id, channel, claimed_by, claim_expires_at
FROM notification_deliveries
WHERE claimed_by IS NOT NULL AND status = 'pending'
  AND claim_expires_at < now() - make_interval(secs => %(grace_seconds)s)
ORDER BY id
LIMIT %(limit)s
FOR KEY SHARE SKIP LOCKED
