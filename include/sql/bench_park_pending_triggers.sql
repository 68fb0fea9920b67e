-- herald bench --latency: set the loaded phase's triggers aside (normal ones: the load is a normal run),
-- so that the idle phase is idle.
UPDATE notification_triggers SET status = 'bench_parked', priority = 'normal' WHERE status = 'pending'
