-- herald bench --latency: give the loaded phase its triggers back.
UPDATE notification_triggers SET status = 'pending' WHERE status = 'bench_parked'
