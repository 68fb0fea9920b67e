-- The batches a run still holds (pending deliveries under its claim), so a retried claim task returns
-- the same batches instead of claiming more. Index: notification_deliveries_claim_idx.
SELECT claim_batch, priority, channel, count(*)::int AS deliveries
FROM notification_deliveries
WHERE claimed_by = %(claim_id)s AND status = 'pending'
GROUP BY claim_batch, priority, channel
ORDER BY claim_batch
