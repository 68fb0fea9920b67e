-- herald bench --latency: what the loaded phase's normal runs did (their herald_runs records): runs,
-- triggers, notifications delivered, and seconds from the first start to the last end.
SELECT count(*), coalesce(sum(triggers), 0), coalesce(sum((counts ->> 'delivered')::bigint), 0),
       extract(epoch FROM max(finished_at) - min(started_at))
FROM herald_runs WHERE mode IN ('scheduled', 'manual') AND triggers > 0
