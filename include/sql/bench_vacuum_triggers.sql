-- herald bench: after bench_reset_pending_triggers.sql, the dead row versions gone and statistics fresh.
VACUUM ANALYZE notification_triggers, notifications, notification_outcomes, notification_deliveries, herald_runs
