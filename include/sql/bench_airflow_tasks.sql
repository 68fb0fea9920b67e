-- herald bench --dag (Airflow metadata DB): the task instances of one DAG run, for the report.
SELECT task_id, map_index, state, pool, try_number, start_date, end_date, duration
FROM task_instance
WHERE dag_id = %(dag_id)s AND run_id = %(run_id)s
ORDER BY start_date NULLS LAST, task_id, map_index
