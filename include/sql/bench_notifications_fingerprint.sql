-- herald bench: what a run produced, as counts and an order-independent md5 of (trigger, user, title, body).
-- Digests have no trigger id; they count, and hash, as trigger "-".
SELECT count(*) AS notifications,
       count(*) FILTER (WHERE trigger_id IS NULL) AS digests,
       md5(coalesce(string_agg(coalesce(trigger_id::text, '-') || '|' || user_id || '|' || title || '|' || body,
                               E'\n' ORDER BY trigger_id NULLS FIRST, user_id, title, body), '')) AS md5
FROM notifications
