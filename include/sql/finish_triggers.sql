-- End a batch's triggers 'done' or 'failed' (with the reason), only while this run still holds them
-- (it does: load_batch_triggers.sql locked them; the batch checks that every one was ended and rolls
-- back otherwise). Returns how many ended per status. Index: primary key.
WITH ended AS (
    UPDATE notification_triggers t
    SET status = f.status,
        last_error = f.error,
        recipient_count = f.recipients,
        processed_at = now(),
        claim_expires_at = NULL
    FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(errors)s::text[], %(recipients)s::int[])
         AS f(id, status, error, recipients)
    WHERE t.id = f.id AND t.claimed_by = %(claim_id)s AND t.status = 'pending'
    RETURNING t.status
)
SELECT status, count(*) FROM ended GROUP BY status
