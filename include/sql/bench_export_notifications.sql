-- herald bench: the core's notification rows in COPY text format, to load again for the COPY floor.
COPY (
    SELECT user_id, trigger_id, notification_type, title, body, payload, priority
    FROM notifications
    ORDER BY id
) TO STDOUT
