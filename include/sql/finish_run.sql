-- Record how a run ended. Index: primary key.
UPDATE herald_runs
SET finished_at = now(),
    counts = %(counts)s,
    duration_seconds = extract(epoch FROM now() - started_at)
WHERE run_id = %(run_id)s
