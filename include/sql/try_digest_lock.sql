-- One digest pass at a time (transaction-scoped): a second concurrent pass skips instead of doubling.
SELECT pg_try_advisory_xact_lock(hashtextextended('herald-digests', 0))
