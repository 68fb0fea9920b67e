-- herald.stats.queue_stats: every numeric key of herald_runs.counts summed over the runs that finished
-- in the short window (last hour) and in the long window (last 24 hours). Dry runs deliver nothing and
-- are left out. The started_at bound lets herald_runs_started_idx (0002) limit the scan; a run that
-- took longer than %(max_run_seconds)s is not counted.
SELECT
    c.key,
    sum(c.value::numeric) FILTER (
        WHERE r.finished_at > now() - make_interval(secs => %(short_window_seconds)s)
    )                         AS short_total,
    sum(c.value::numeric)     AS long_total
FROM herald_runs AS r
CROSS JOIN LATERAL jsonb_each(r.counts) AS c(key, value)
WHERE r.started_at > now() - make_interval(secs => %(long_window_seconds)s + %(max_run_seconds)s)
  AND r.finished_at > now() - make_interval(secs => %(long_window_seconds)s)
  AND NOT r.dry_run
  AND jsonb_typeof(c.value) = 'number'
GROUP BY c.key
