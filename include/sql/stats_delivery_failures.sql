-- herald.stats.queue_stats: why deliveries failed or were disabled, most frequent first: channel,
-- status, reason (reasons never carry an address or a body), how many, the latest.
-- Index: notification_deliveries_failed_idx (partial on failed and disabled).
SELECT channel, status, left(coalesce(last_error, '(no reason)'), 300) AS reason, count(*) AS n,
       max(updated_at) AS latest
FROM notification_deliveries
WHERE status IN ('failed', 'disabled')
GROUP BY channel, status, left(coalesce(last_error, '(no reason)'), 300)
ORDER BY count(*) DESC, max(updated_at) DESC
LIMIT %(limit)s
