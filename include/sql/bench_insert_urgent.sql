-- herald bench --latency: the application inserting one urgent trigger for one user.
INSERT INTO notification_triggers (trigger_type, user_id, priority, payload)
VALUES ('security_alert', %(user_id)s, 'urgent', %(payload)s)
RETURNING id
