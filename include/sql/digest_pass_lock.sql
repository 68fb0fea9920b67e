-- One digest pass at a time (session lock, released by digest_pass_unlock.sql): a second concurrent
-- pass skips instead of waiting. Correctness does not depend on it (the rate-limit bucket locks do
-- that); it only saves a duplicate walk over the held outcomes.
SELECT pg_try_advisory_lock(hashtextextended('herald-digests', 0))
