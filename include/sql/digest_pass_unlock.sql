-- Releases digest_pass_lock.sql.
SELECT pg_advisory_unlock(hashtextextended('herald-digests', 0))
