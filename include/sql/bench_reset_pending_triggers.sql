-- herald bench: the seeded pending triggers (ids after the %(done)s done ones of the history) pending
-- again, as workload.seed left them.
UPDATE notification_triggers
SET status = 'pending', attempts = 0, claimed_by = NULL, claim_batch = NULL, claimed_at = NULL,
    claim_expires_at = NULL, processed_at = NULL, last_error = NULL, recipient_count = NULL
WHERE id > %(done)s
