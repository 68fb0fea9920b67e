-- Redis fallback only: serialise rate-limit decisions per user across concurrent batches until the
-- batch's transaction commits (transaction-scoped advisory locks, taken in id order: no deadlock).
SELECT count(pg_advisory_xact_lock(hashtextextended('herald-rate-limit', u.id)))
FROM (SELECT DISTINCT id FROM unnest(%(user_ids)s::bigint[]) AS q(id) ORDER BY id) AS u
