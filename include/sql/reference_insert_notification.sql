-- Reference processor: one notification; a row already there for (trigger, user) is kept as it is.
INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, payload, priority)
VALUES (%(user_id)s, %(trigger_id)s, %(notification_type)s, %(title)s, %(body)s, %(payload)s, %(priority)s)
ON CONFLICT (trigger_id, user_id) DO NOTHING
