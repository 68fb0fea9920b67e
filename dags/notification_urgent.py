"""
### notification_urgent

The urgent lane: runs seconds after the application INSERTs an urgent trigger, instead of waiting for
the next two-minute `notification_batch` run.

* **Wake-up**: a statement trigger NOTIFYs `herald_urgent` at the commit of urgent inserts; the
  watcher of asset `herald_urgent_triggers` (`herald.urgent.UrgentTriggersWaiting`, in the
  triggerer) listens, and also looks at the table every 2 s, so a lost signal costs a poll.
* **One task**, `deliver_urgent`, in pool `urgent_notifications` and queue `urgent`: claims urgent
  triggers only (`SKIP LOCKED`, so overlapping with `notification_batch` is safe), processes them
  and records the run. It never waits behind a running normal run (a DAG of its own).
* **Safety net**: `notification_batch` claims urgent triggers first every two minutes; pause this DAG
  to switch the lane off.

Logic lives in the `herald` package; see the project README.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetWatcher, dag, get_current_context, task

from herald import airflow_tasks
from herald.config import POOL_URGENT, QUEUE_URGENT, URGENT_ASSET, URGENT_DAG_ID
from herald.urgent import UrgentTriggersWaiting

urgent_triggers = Asset(
    URGENT_ASSET,
    watchers=[AssetWatcher(name="herald_urgent_inserts", trigger=UrgentTriggersWaiting())],
)


@dag(
    dag_id=URGENT_DAG_ID,
    schedule=[urgent_triggers],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    default_args={
        "owner": "herald",
        "retries": 2,
        "retry_delay": timedelta(seconds=5),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=30),
        "execution_timeout": timedelta(minutes=5),
    },
    tags=["herald", "notifications", "urgent"],
    doc_md=__doc__,
)
def notification_urgent():
    @task(pool=POOL_URGENT, queue=QUEUE_URGENT, priority_weight=100, weight_rule="absolute")
    def deliver_urgent() -> dict:
        dag_run = get_current_context()["dag_run"]
        return airflow_tasks.urgent_lane(airflow_tasks.claim_id_for(dag_run.run_id, dag_run.clear_number))

    deliver_urgent()


notification_urgent()
