-- Reference processor: whether the user has held (rate-limited) outcomes waiting for a digest: then a
-- new normal notification is held too. Index: notification_outcomes_undigested_idx.
SELECT EXISTS (SELECT 1 FROM notification_outcomes WHERE user_id = %(user_id)s AND outcome = 'rate_limited')
