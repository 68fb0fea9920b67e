-- herald bench --dag (Airflow metadata DB): DAG files that failed to import.
SELECT filename, stacktrace FROM import_error ORDER BY filename
