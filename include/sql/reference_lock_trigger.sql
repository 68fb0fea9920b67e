-- Reference processor: one trigger, locked for this transaction, if it is still pending and nobody
-- else holds a live claim on it (SKIP LOCKED: a trigger a claim is being taken on right now is left).
-- Index: primary key.
SELECT id, trigger_type, entity_type, entity_id, user_id, priority, payload
FROM notification_triggers
WHERE id = %(trigger_id)s
  AND status = 'pending'
  AND NOT (claimed_by IS NOT NULL AND claim_expires_at > now())
FOR UPDATE SKIP LOCKED
