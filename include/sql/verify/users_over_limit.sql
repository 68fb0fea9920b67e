-- verify: users who received more than %(rate_limit)s normal notifications (digests included) in some
-- sliding window of %(window_seconds)s seconds ending since %(since)s. For each such notification,
-- the count of the user's normal ones in (created_at - window, created_at], as the limiter counts.
-- Urgent ones are left out: they are never held back, so they may push a window past the limit.
-- Index: notifications_created_brin (the rows since the start of the first window).
WITH normal AS (
    SELECT user_id, created_at,
           count(*) OVER (PARTITION BY user_id ORDER BY created_at
                          RANGE BETWEEN make_interval(secs => %(window_seconds)s) - interval '1 microsecond'
                                PRECEDING AND CURRENT ROW) AS in_window
    FROM notifications
    WHERE priority <> 'urgent'
      AND created_at >= %(since)s::timestamptz - make_interval(secs => %(window_seconds)s)
)
SELECT user_id, max(in_window) AS most, min(created_at) AS first_over
FROM normal
WHERE created_at >= %(since)s AND in_window > %(rate_limit)s
GROUP BY user_id
ORDER BY user_id
LIMIT %(limit)s
