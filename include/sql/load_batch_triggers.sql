-- A mapped task's triggers: the pending ones its run claimed under this batch number, locked until the
-- batch commits. While they are locked no other run can claim them (claims skip locked rows) and no
-- cleanup can release them, so the batch writes only what it owns, however long it works.
-- The payload comes as text and is decoded per trigger, so one payload Python cannot decode fails
-- that trigger alone. Priorities other than 'urgent' count as normal. Index: claim_idx.
SELECT id, trigger_type, entity_type, entity_id, user_id,
       CASE WHEN priority = 'urgent' THEN 'urgent' ELSE 'normal' END AS priority,
       payload::text, attempts
FROM notification_triggers
WHERE claimed_by = %(claim_id)s AND claim_batch = %(batch)s AND status = 'pending'
ORDER BY id
FOR UPDATE
