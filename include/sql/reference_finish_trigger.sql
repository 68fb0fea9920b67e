-- Reference processor: end one trigger 'done' or 'failed' (with its reason). Index: primary key.
UPDATE notification_triggers
SET status = %(status)s,
    last_error = %(error)s,
    recipient_count = %(recipients)s,
    processed_at = now()
WHERE id = %(trigger_id)s AND status = 'pending'
