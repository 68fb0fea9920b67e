-- herald.stats.queue_stats: the latest runs, newest first (a backward scan of herald_runs_started_idx).
-- batches is left out: it can be large and the overview does not need it.
SELECT
    run_id,
    mode,
    dry_run,
    started_at,
    finished_at,
    triggers,
    counts,
    coalesce(duration_seconds, extract(epoch FROM finished_at - started_at)) AS duration_seconds
FROM herald_runs
ORDER BY started_at DESC
LIMIT %(limit)s
