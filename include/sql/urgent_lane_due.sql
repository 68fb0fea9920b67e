-- The urgent lane's listener (herald/urgent.py): should it wake the lane? Waiting: pending urgent
-- triggers nobody holds (no live lease). Due when
--   * one of them is newer than the last wake-up, and none of those the last wake-up was for is still
--     waiting (otherwise the run it woke has not claimed yet, and will take the newer ones too: waking
--     the lane again would only make an empty run); or
--   * they are still waiting %(stale_seconds)s after the last wake-up (its run died, or never came).
-- When due, the wake-up is recorded in the same statement, so two listeners never fire for the same
-- triggers. Returns (waiting, woken through trigger id), the latter NULL when not due.
-- Index: notification_triggers_pending_idx ((priority <> 'urgent'), id) WHERE status = 'pending'.
WITH waiting AS (
    SELECT id
    FROM notification_triggers
    WHERE status = 'pending'
      AND (priority <> 'urgent') = false
      AND (claim_expires_at IS NULL OR claim_expires_at < now())
), lane AS (
    SELECT signalled_through, signalled_at FROM herald_urgent_lane WHERE lane = 'urgent'
), due AS (
    SELECT count(*) AS n, max(w.id) AS newest, min(w.id) AS oldest
    FROM waiting w
), woken AS (
    UPDATE herald_urgent_lane l
    SET signalled_through = d.newest, signalled_at = now()
    FROM due d
    WHERE l.lane = 'urgent'
      AND d.n > 0
      AND ((d.newest > l.signalled_through AND d.oldest > l.signalled_through)
           OR l.signalled_at < now() - make_interval(secs => %(stale_seconds)s))
    RETURNING l.signalled_through
)
SELECT (SELECT n FROM due), (SELECT signalled_through FROM woken)
