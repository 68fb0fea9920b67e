-- herald bench --dag (Airflow metadata DB): whether the DAG is parsed and serialized, and paused.
SELECT d.is_paused, EXISTS (SELECT 1 FROM serialized_dag s WHERE s.dag_id = d.dag_id) AS serialized
FROM dag d
WHERE d.dag_id = %(dag_id)s AND NOT d.is_stale
