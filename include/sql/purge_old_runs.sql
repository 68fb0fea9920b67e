-- Housekeeping: drop run records older than the retention period. Index: herald_runs_started_idx.
DELETE FROM herald_runs WHERE started_at < now() - make_interval(days => %(retention_days)s)
