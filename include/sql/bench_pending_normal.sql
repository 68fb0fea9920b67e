-- herald bench --latency: normal triggers still to process (the loaded phase lasts while there are).
SELECT count(*) FROM notification_triggers WHERE status = 'pending' AND priority <> 'urgent'
