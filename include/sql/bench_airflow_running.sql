-- herald bench (Airflow metadata DB): whether a run of the DAG is running now.
SELECT run_id FROM dag_run WHERE dag_id = %(dag_id)s AND state = 'running' LIMIT 1
