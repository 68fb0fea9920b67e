-- Serialise every rate-limit decision per user until this transaction ends, whoever takes it (a batch
-- of any run or lane, a digest pass): whoever holds a user's lock sees every notification of that user
-- that exists or will ever exist, so the window count read after it is exact.
-- Users are grouped into 128 buckets (hashint8(user_id) & 127), one transaction-scoped advisory lock
-- each: at most 128 locks however many users, so lock memory never runs out (one lock per user did,
-- at about 30,000 users with the default max_locks_per_transaction). Taken in bucket order, so two
-- transactions never deadlock on them.
SELECT count(pg_advisory_xact_lock(%(lock_class)s, b.bucket))
FROM (
    SELECT DISTINCT hashint8(u.id) & 127 AS bucket
    FROM unnest(%(user_ids)s::bigint[]) AS u(id)
    ORDER BY 1
) AS b
