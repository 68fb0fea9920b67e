"""
### notification_delivery

Every minute: **claim** due channel deliveries (email, webhooks, Apprise targets) from the outbox that
`notification_batch` writes with each notification (urgent first, `FOR UPDATE SKIP LOCKED`, a lease),
**send** them in mapped tasks, one per batch of a channel (each channel in its own pool, so a slow SMTP
server holds back only email; urgent deliveries of every channel in the `urgent_notifications` pool and
the `urgent` queue, ahead of the rest), then **finalize** (release what was claimed and not sent).

* Delivery is **at least once**: a send whose recording was lost is sent again with the same
  idempotency id (`webhook-id`, `Message-ID`), so receivers can deduplicate.
* Each delivery is retried with exponential backoff and jitter up to `herald_delivery_max_attempts`,
  then ends `failed` with its last error, shown on the herald page.
* **Manual run** with `redeliver_failed` re-drives every failed delivery (after fixing the cause),
  `channels` limits the run to some channels, `max_deliveries` bounds it.

Logic lives in `herald.channels`; see the project README, "Channels".
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from herald import airflow_tasks
from herald.config import CHANNEL_POOLS, CHANNELS, DELIVERY_DAG_ID, POOL_URGENT, QUEUE_URGENT

default_args = {
    "owner": "herald",
    "retries": 3,
    "retry_delay": timedelta(seconds=10),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=2),
    "execution_timeout": timedelta(minutes=30),
}


@dag(
    dag_id=DELIVERY_DAG_ID,
    schedule=CronTriggerTimetable("* * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["herald", "notifications", "channels"],
    doc_md=__doc__,
    params={
        "redeliver_failed": Param(False, type="boolean",
                                  description="Make every failed delivery pending again (fresh attempts) first"),
        "channels": Param(None, type=["null", "array"], items={"type": "string", "enum": list(CHANNELS)},
                          description="Only these channels (default: all)"),
        "max_deliveries": Param(None, type=["null", "integer"], minimum=1, maximum=10_000_000,
                                description="Max deliveries this run claims (default: herald_delivery_max_per_run)"),
    },
)
def notification_delivery():
    @task(execution_timeout=timedelta(minutes=2))
    def claim() -> dict:
        context = get_current_context()
        dag_run = context["dag_run"]
        airflow_tasks.check_conf(dag_run.conf, context["dag"].params.keys())
        claim_id = airflow_tasks.claim_id_for(dag_run.run_id, dag_run.clear_number)
        return airflow_tasks.delivery_claim(claim_id, dict(context["params"]))

    @task(execution_timeout=timedelta(minutes=1))
    def batches_of(claimed: dict, lane: str) -> list[dict]:
        return claimed[lane]

    @task(map_index_template="{{ batch_label }}")
    def send(batch: dict) -> dict:
        get_current_context()["batch_label"] = batch["label"]
        return airflow_tasks.deliver(batch)

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=5))
    def finalize(claimed: dict | None, urgent: list[dict] | None, email: list[dict] | None,
                 webhook: list[dict] | None, apprise: list[dict] | None) -> dict:
        dag_run = get_current_context()["dag_run"]
        claim_id = (claimed or {}).get("claim_id") or airflow_tasks.claim_id_for(dag_run.run_id,
                                                                                  dag_run.clear_number)
        return airflow_tasks.delivery_finalize(claim_id, [urgent, email, webhook, apprise])

    claimed = claim()
    urgent = send.override(task_id="send_urgent", pool=POOL_URGENT, queue=QUEUE_URGENT, priority_weight=100,
                           weight_rule="absolute").expand(
        batch=batches_of.override(task_id="urgent_batches")(claimed, "urgent"))
    email, webhook, apprise = (
        send.override(task_id=f"send_{channel}", pool=CHANNEL_POOLS[channel]).expand(
            batch=batches_of.override(task_id=f"{channel}_batches")(claimed, channel))
        for channel in CHANNELS
    )
    lanes = [urgent, email, webhook, apprise]
    finished = finalize(claimed, urgent, email, webhook, apprise)

    # finalize runs whatever happened (all_done); this leaf fails the run when any task failed for good.
    @task(trigger_rule="one_failed", execution_timeout=timedelta(minutes=1))
    def watcher() -> None:
        raise AirflowFailException("a task of this run failed; see its log (unsent deliveries were released)")

    [claimed, *lanes, finished] >> watcher()


notification_delivery()
