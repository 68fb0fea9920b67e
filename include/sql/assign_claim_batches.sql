-- Record which mapped batch each claimed trigger belongs to. Index: primary key.
UPDATE notification_triggers t
SET claim_batch = b.batch
FROM unnest(%(ids)s::bigint[], %(batches)s::int[]) AS b(id, batch)
WHERE t.id = b.id AND t.claimed_by = %(claim_id)s
