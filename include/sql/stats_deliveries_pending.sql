-- herald.stats.queue_stats: the outbox's pending deliveries per channel, in one pass over the pending
-- set (WHERE status = 'pending' matches the predicate of notification_deliveries_due_idx, so only
-- pending rows are read however many were sent): how many, how many are due now, how many wait for a
-- retry, and the age of the oldest.
SELECT channel,
       count(*)                                                    AS pending,
       count(*) FILTER (WHERE next_attempt_at <= now())            AS due,
       count(*) FILTER (WHERE attempts > 0)                        AS retrying,
       extract(epoch FROM now() - min(created_at))                 AS oldest_age_seconds
FROM notification_deliveries
WHERE status = 'pending'
GROUP BY channel
ORDER BY channel
