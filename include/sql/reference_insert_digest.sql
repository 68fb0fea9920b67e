-- Reference digest pass: one digest notification (trigger_id NULL: it summarises many triggers).
INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, payload, priority)
VALUES (%(user_id)s, NULL, 'digest', %(title)s, %(body)s, %(payload)s, 'normal')
RETURNING id
