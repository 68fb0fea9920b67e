-- Reference digest pass: fold one user's rate-limited outcomes, up to the newest held trigger, into
-- their digest. Index: notification_outcomes_undigested_idx.
UPDATE notification_outcomes
SET outcome = 'digested', digest_id = %(digest_id)s
WHERE user_id = %(user_id)s AND outcome = 'rate_limited' AND trigger_id <= %(through_trigger_id)s
