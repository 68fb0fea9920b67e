-- Dry run: the trigger ids its claim recorded for one batch (herald_runs.batches). Index: primary key.
SELECT coalesce(array_agg(id::bigint), '{}')
FROM herald_runs r, jsonb_array_elements_text(r.batches -> %(batch)s -> 'trigger_ids') AS ids(id)
WHERE r.run_id = %(run_id)s
