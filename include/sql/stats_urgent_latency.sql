-- The urgent lane over the last window: urgent triggers processed in it, and the median and 95th
-- percentile of the time from each one's INSERT (created_at) to the start of the batch that delivered it
-- (processed_at, that batch's transaction start; its commit follows within the batch's duration).
-- Index: notification_triggers_processed_idx.
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - created_at)) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - created_at)) AS p95
FROM notification_triggers
WHERE processed_at >= now() - make_interval(secs => %(window_seconds)s)
  AND priority = 'urgent' AND status = 'done'
