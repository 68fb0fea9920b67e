-- verify: claims whose lease ran out more than %(grace_seconds)s ago and that nobody took over: a run
-- died and no later run (or housekeeping) picked its triggers up. Rows a batch is working on right now
-- are skipped (SKIP LOCKED: its lock, not its lease, protects them). Index: pending_idx (partial).
SELECT id, claimed_by, claim_expires_at
FROM notification_triggers
WHERE status = 'pending'
  AND claim_expires_at < now() - make_interval(secs => %(grace_seconds)s)
ORDER BY id
LIMIT %(limit)s
FOR KEY SHARE SKIP LOCKED
