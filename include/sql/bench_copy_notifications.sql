-- herald bench: the COPY floor, the same columns the pipeline's insert_notifications.sql writes.
COPY notifications (user_id, trigger_id, notification_type, title, body, payload, priority) FROM STDIN
