-- Record a run's claim (its batch descriptors), once per run id. Index: primary key.
INSERT INTO herald_runs (run_id, mode, dry_run, triggers, batches)
VALUES (%(run_id)s, %(mode)s, %(dry_run)s, %(triggers)s, %(batches)s)
ON CONFLICT (run_id) DO UPDATE
SET mode = EXCLUDED.mode, dry_run = EXCLUDED.dry_run, triggers = EXCLUDED.triggers,
    batches = EXCLUDED.batches, started_at = now(), finished_at = NULL, counts = '{}',
    duration_seconds = NULL
