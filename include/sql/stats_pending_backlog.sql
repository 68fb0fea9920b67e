-- herald.stats.queue_stats: the pending backlog at a glance, in one pass over the pending set.
-- WHERE status = 'pending' matches the predicate of notification_triggers_pending_idx (0002), so the
-- scan covers only the pending triggers (small) however many done/failed triggers the table holds.
-- A claimed trigger stays 'pending' until it ends: "held" claims are unexpired, "expired" ones await
-- reclaiming by the next run.
SELECT
    count(*) FILTER (WHERE priority = 'normal')                                      AS pending_normal,
    count(*) FILTER (WHERE priority = 'urgent')                                      AS pending_urgent,
    extract(epoch FROM now() - min(created_at) FILTER (WHERE priority = 'normal'))   AS oldest_normal_age_seconds,
    extract(epoch FROM now() - min(created_at) FILTER (WHERE priority = 'urgent'))   AS oldest_urgent_age_seconds,
    count(*) FILTER (WHERE claimed_by IS NOT NULL AND claim_expires_at > now())      AS claims_held,
    count(*) FILTER (WHERE claimed_by IS NOT NULL AND claim_expires_at <= now())     AS claims_expired
FROM notification_triggers
WHERE status = 'pending'
