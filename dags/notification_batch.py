"""
### notification_batch

Every two minutes: **claim** pending notification triggers (urgent first, a bounded slice of the
queue), process them in **mapped batches** (urgent batches in the `urgent_notifications` pool and the
`urgent` queue, ahead of normal ones), then **finalize** (record the run, release unfinished claims,
send due digests).

* **Manual run**: use *Trigger DAG* with the form: batch size, max triggers, only urgent, dry run
  (computes and reports, writes no notification), and user ids (support cases).
* **Retry** any task freely: every write is idempotent, one notification per (trigger, user).
* **Backfill** re-drives the failed (or never processed) triggers created in each run's data
  interval (the two minutes after its logical date); windows already have scheduled runs, so:
  `airflow backfill create --dag-id notification_batch --from-date ... --to-date ... --reprocess-behavior completed`.
* A conf key the DAG does not declare (`{"dryrun": true}`) fails the run at once, naming the key.

Logic lives in the `herald` package; see the project README.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from herald import airflow_tasks
from herald.config import DAG_ID, POOL_NORMAL, POOL_URGENT, QUEUE_URGENT

default_args = {
    "owner": "herald",
    "retries": 3,
    "retry_delay": timedelta(seconds=10),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=2),
    "execution_timeout": timedelta(minutes=5),
}


def _params() -> dict:
    context = get_current_context()
    return dict(context["params"])


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable("*/2 * * * *", timezone="UTC", interval=timedelta(minutes=2)),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["herald", "notifications"],
    doc_md=__doc__,
    params={
        "batch_size": Param(None, type=["null", "integer"], minimum=1, maximum=1_000_000,
                            description="Max recipients per mapped batch (default: Variable herald_batch_size)"),
        "max_triggers": Param(None, type=["null", "integer"], minimum=1, maximum=1_000_000,
                              description="Max triggers this run claims (default: herald_max_triggers_per_run)"),
        "only_urgent": Param(False, type="boolean", description="Claim urgent triggers only"),
        "dry_run": Param(False, type="boolean",
                         description="Compute and report; write no notification, outcome or rate-limit count"),
        "user_ids": Param(None, type=["null", "array"], items={"type": "integer"},
                          description="Only triggers that concern these user ids (support cases)"),
    },
)
def notification_batch():
    @task(execution_timeout=timedelta(minutes=2))
    def claim() -> dict:
        context = get_current_context()
        dag_run = context["dag_run"]
        airflow_tasks.check_conf(dag_run.conf, context["dag"].params.keys())
        claim_id = airflow_tasks.claim_id_for(dag_run.run_id, dag_run.clear_number)
        interval = (context.get("data_interval_start"), context.get("data_interval_end"))
        return airflow_tasks.claim(claim_id, dag_run.run_type, _params(), interval)

    # Airflow maps over a task's return value only, so each priority's list gets its own tiny task.
    @task(execution_timeout=timedelta(minutes=1))
    def batches_of(claimed: dict, priority: str) -> list[dict]:
        return claimed[priority]

    @task(map_index_template="{{ batch_label }}")
    def process(batch: dict) -> dict:
        get_current_context()["batch_label"] = batch["label"]
        return airflow_tasks.process(batch, _params())

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=5))
    def finalize(claimed: dict | None, urgent: list[dict] | None, normal: list[dict] | None) -> dict:
        dag_run = get_current_context()["dag_run"]
        claim_id = (claimed or {}).get("claim_id") or airflow_tasks.claim_id_for(dag_run.run_id,
                                                                                  dag_run.clear_number)
        return airflow_tasks.finalize(claim_id, [urgent, normal], _params())

    claimed = claim()
    urgent = process.override(
        task_id="process_urgent", pool=POOL_URGENT, queue=QUEUE_URGENT,
        priority_weight=100, weight_rule="absolute",
    ).expand(batch=batches_of.override(task_id="urgent_batches")(claimed, "urgent"))
    normal = process.override(task_id="process_normal", pool=POOL_NORMAL).expand(
        batch=batches_of.override(task_id="normal_batches")(claimed, "normal")
    )
    finished = finalize(claimed, urgent, normal)

    # finalize runs whatever happened (all_done), so on its own it would mark every run a success.
    # This leaf fails the run when any task failed for good, so operators see it in the UI.
    @task(trigger_rule="one_failed", execution_timeout=timedelta(minutes=1))  # AirflowFailException: no retry
    def watcher() -> None:
        raise AirflowFailException("a task of this run failed; see its log (the run's claims were released)")

    [claimed, urgent, normal, finished] >> watcher()


notification_batch()
