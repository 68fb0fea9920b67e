-- A run's recorded claim and whether any of its triggers are still pending under its claim (a retried
-- claim task then returns the same batches). Indexes: herald_runs primary key, claim_idx.
SELECT r.batches,
       EXISTS (SELECT 1 FROM notification_triggers t
               WHERE t.claimed_by = r.run_id AND t.status = 'pending') AS has_pending
FROM herald_runs r
WHERE r.run_id = %(run_id)s
