-- herald.stats.queue_stats: deliveries written in the last %(window_seconds)s seconds, per channel and
-- status (what became of them). Index: notification_deliveries_created_brin.
SELECT channel, status, count(*) AS n
FROM notification_deliveries
WHERE created_at > now() - make_interval(secs => %(window_seconds)s)
GROUP BY channel, status
ORDER BY channel, status
