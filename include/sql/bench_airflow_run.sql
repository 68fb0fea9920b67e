-- herald bench --dag (Airflow metadata DB): state and times of one DAG run.
SELECT state, queued_at, start_date, end_date, run_type
FROM dag_run
WHERE dag_id = %(dag_id)s AND run_id = %(run_id)s
