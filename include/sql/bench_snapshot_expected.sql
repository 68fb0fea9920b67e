-- herald bench: keep the processing core's notifications (this session only) to compare other runs with.
CREATE TEMPORARY TABLE bench_expected AS
SELECT trigger_id, user_id, title, body FROM notifications
