-- A mapped task's triggers: the pending ones its run claimed under this batch number.
-- Index: notification_triggers_claim_idx (claimed_by, claim_batch).
SELECT id, trigger_type, entity_type, entity_id, user_id, priority, payload, attempts
FROM notification_triggers
WHERE claimed_by = %(claim_id)s AND claim_batch = %(batch)s AND status = 'pending'
ORDER BY id
