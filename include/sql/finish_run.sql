-- Record how a run ended, with the backlog left behind (for the monitoring chart; the count reads
-- the small partial index notification_triggers_pending_idx). Index: herald_runs primary key.
UPDATE herald_runs
SET finished_at = now(),
    counts = %(counts)s::jsonb || jsonb_build_object(
        'backlog', (SELECT count(*) FROM notification_triggers WHERE status = 'pending')),
    duration_seconds = extract(epoch FROM now() - started_at)
WHERE run_id = %(run_id)s
