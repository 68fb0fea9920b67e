"""
### notification_housekeeping

Hourly: clear expired claims, fail triggers that exhausted their attempts, purge outcome and run
records older than the retention period (Variable `herald_retention_days`; held notifications are
never purged), send digests that came due, give a TTL to any herald Redis key that lost one, and run
`herald verify` over the last two hours (violations are logged as errors and set the gauge
`herald.verify.violations`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from herald import airflow_tasks
from herald.config import HOUSEKEEPING_DAG_ID, POOL_NORMAL


@dag(
    dag_id=HOUSEKEEPING_DAG_ID,
    schedule="17 * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "herald",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=15),
    },
    tags=["herald", "notifications", "housekeeping"],
    doc_md=__doc__,
)
def notification_housekeeping():
    @task(pool=POOL_NORMAL)
    def housekeeping() -> dict[str, int]:
        return airflow_tasks.housekeeping()

    housekeeping()


notification_housekeeping()
