-- herald.stats.queue_stats: the chart. %(buckets)s buckets of %(bucket_seconds)s seconds ending with the
-- current (partial) one, aligned on UTC; per bucket, what the runs that finished in it processed
-- (triggers_done + triggers_failed) and delivered, and the backlog the last of them recorded
-- (counts.backlog, when runs record it). Dry runs are left out. herald_runs_started_idx (0002) limits
-- the scan through the started_at bound; a run longer than %(max_run_seconds)s is not counted.
WITH bounds AS (
    SELECT
        make_interval(secs => %(bucket_seconds)s)                                      AS width,
        date_bin(make_interval(secs => %(bucket_seconds)s), now(), timestamptz '2000-01-01 00:00:00+00')
            - make_interval(secs => %(bucket_seconds)s * (%(buckets)s - 1))             AS first_start
),
buckets AS (
    SELECT generate_series(b.first_start, b.first_start + b.width * (%(buckets)s - 1), b.width) AS bucket_start
    FROM bounds AS b
),
runs AS (
    SELECT
        date_bin(b.width, r.finished_at, timestamptz '2000-01-01 00:00:00+00') AS bucket_start,
        r.finished_at,
        coalesce(jsonb_path_query_first(r.counts, '$.triggers_done ? (@.type() == "number")')::numeric, 0)
          + coalesce(jsonb_path_query_first(r.counts, '$.triggers_failed ? (@.type() == "number")')::numeric, 0)
                                                                                     AS triggers_processed,
        coalesce(jsonb_path_query_first(r.counts, '$.delivered ? (@.type() == "number")')::numeric, 0)
                                                                                     AS delivered,
        jsonb_path_query_first(r.counts, '$.backlog ? (@.type() == "number")')::numeric AS backlog
    FROM herald_runs AS r, bounds AS b
    WHERE r.started_at >= b.first_start - make_interval(secs => %(max_run_seconds)s)
      AND r.finished_at >= b.first_start
      AND NOT r.dry_run
)
SELECT
    k.bucket_start,
    count(r.finished_at)                                                               AS runs,
    coalesce(sum(r.triggers_processed), 0)                                             AS triggers_processed,
    coalesce(sum(r.delivered), 0)                                                      AS delivered,
    (array_agg(r.backlog ORDER BY r.finished_at DESC) FILTER (WHERE r.backlog IS NOT NULL))[1] AS backlog
FROM buckets AS k
LEFT JOIN runs AS r ON r.bucket_start = k.bucket_start
GROUP BY k.bucket_start
ORDER BY k.bucket_start
