-- herald bench: notifications missing from / extra to the core's (bench_expected), as multisets,
-- with up to 5 examples of each.
WITH actual AS (
    SELECT trigger_id, user_id, title, body FROM notifications
), missing AS (
    SELECT * FROM bench_expected EXCEPT ALL SELECT * FROM actual
), extra AS (
    SELECT * FROM actual EXCEPT ALL SELECT * FROM bench_expected
)
SELECT (SELECT count(*) FROM missing) AS missing,
       (SELECT count(*) FROM extra) AS extra,
       (SELECT coalesce(json_agg(m), '[]'::json)
        FROM (SELECT * FROM missing ORDER BY trigger_id NULLS FIRST, user_id LIMIT 5) m) AS missing_examples,
       (SELECT coalesce(json_agg(e), '[]'::json)
        FROM (SELECT * FROM extra ORDER BY trigger_id NULLS FIRST, user_id LIMIT 5) e) AS extra_examples
