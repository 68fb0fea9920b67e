-- Reference processor: the outcome of one recipient that got no notification (skipped, rate-limited,
-- failed). Primary key (trigger_id, user_id): an outcome already there is kept.
INSERT INTO notification_outcomes (trigger_id, user_id, outcome, reason)
VALUES (%(trigger_id)s, %(user_id)s, %(outcome)s, %(reason)s)
ON CONFLICT (trigger_id, user_id) DO NOTHING
