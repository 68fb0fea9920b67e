-- For each of these users with %(normal)s normal candidates in the batch: notifications received in
-- the rate-limit window (normal, urgent and digests all count), and whether rate-limited outcomes still
-- wait for their digest (a user who is owed a digest gets it before any new normal notification).
-- Only the users the decision can hold something back for are returned: owed a digest, or with
-- window + candidates over the limit; the others get all their candidates, whatever their exact count.
-- Read under lock_rate_limit_buckets.sql. Indexes: notifications_user_created_idx (index-only range
-- scan) and notification_outcomes_undigested_idx (partial: only held outcomes).
WITH asked AS (
    SELECT * FROM unnest(%(user_ids)s::bigint[], %(normal)s::int[]) AS a(user_id, normal)
), recent AS (
    SELECT n.user_id, count(*) AS recent
    FROM notifications n
    WHERE n.user_id = ANY(%(user_ids)s::bigint[])
      AND n.created_at > now() - make_interval(secs => %(window_seconds)s)
    GROUP BY n.user_id
), held AS (
    SELECT DISTINCT o.user_id
    FROM notification_outcomes o
    WHERE o.outcome = 'rate_limited' AND o.user_id = ANY(%(user_ids)s::bigint[])
)
SELECT a.user_id, coalesce(r.recent, 0) AS recent, h.user_id IS NOT NULL AS held
FROM asked a
LEFT JOIN recent r USING (user_id)
LEFT JOIN held h USING (user_id)
WHERE h.user_id IS NOT NULL OR coalesce(r.recent, 0) + a.normal > %(rate_limit)s
