-- A mapped task's triggers: the pending ones its run claimed under this batch number, locked until the
-- batch commits. While they are locked no other run can claim them (claims skip locked rows) and no
-- cleanup can release them, so the batch writes only what it owns, however long it works.
-- The payload comes as text and is decoded per trigger, so one payload Python cannot decode fails
-- that trigger alone. Priorities other than 'urgent' count as normal. Each row carries its type's
-- template (NULL: no template), which saves a statement per batch. Indexes: claim_idx, and the primary
-- key of notification_templates.
SELECT t.id, t.trigger_type, t.entity_type, t.entity_id, t.user_id,
       CASE WHEN t.priority = 'urgent' THEN 'urgent' ELSE 'normal' END AS priority,
       t.payload::text, t.attempts,
       m.title_template, m.body_template, m.bypass_preferences
FROM notification_triggers t
LEFT JOIN notification_templates m ON m.trigger_type = t.trigger_type
WHERE t.claimed_by = %(claim_id)s AND t.claim_batch = %(batch)s AND t.status = 'pending'
ORDER BY t.id
FOR UPDATE OF t
