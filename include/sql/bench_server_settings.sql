-- herald bench: the server's version and the settings that matter to the timings, for the report.
SELECT name, setting
FROM pg_settings
WHERE name IN ('server_version', 'shared_buffers', 'synchronous_commit', 'fsync', 'max_connections', 'work_mem')
