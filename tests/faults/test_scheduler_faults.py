"""Fault cases under a real Airflow deployment WITH its two-minute schedule switched on.

api-server + scheduler (LocalExecutor) + dag-processor, PostgreSQL metadata DB, ``notification_batch``
unpaused: scheduled runs happen while the tests trigger, kill and backfill. Every LocalExecutor task
process runs with ``HERALD_FAULT_ONCE=kill@before_write:<marker>``: the first batch task to reach its
writes SIGKILLs its own process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from herald import services
from herald.config import DAG_ID, Settings
from herald.workload import WorkloadSpec, seed
from tests import factories as f
from tests.e2e.airflow_procs import Cluster, deployment
from tests.faults.conftest import settle

pytestmark = pytest.mark.slow

RUN_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def scheduled(found_services: services.Services, db_url: str, redis_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("airflow_home_faults")
    marker = home / "kill_marker"
    with deployment(found_services, db_url, redis_url, home, name="faults_scheduler", schedule=True,
                    scheduler_env={"HERALD_FAULT_ONCE": f"kill@before_write:{marker}"}) as cluster:
        yield cluster


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def settings_of(cluster: Cluster) -> Settings:
    return Settings(cache_namespace=cluster.env["AIRFLOW_VAR_HERALD_CACHE_NAMESPACE"])


def wait_idle(cluster: Cluster, pg) -> None:
    """Until no trigger is pending and no run of the DAG is queued or running."""
    cluster.wait_for(
        lambda: not scalar(pg, "SELECT count(*) FROM notification_triggers WHERE status = 'pending'")
        and not [r for r in cluster.runs() if r["state"] in ("queued", "running")],
        RUN_TIMEOUT_SECONDS, "every trigger to be processed and every run to finish", interval=2)


def test_task_process_sigkilled_mid_batch_under_the_scheduler(pg, scheduled):
    marker = Path(scheduled.scheduler_env["HERALD_FAULT_ONCE"].split(":", 1)[1])
    seed(pg, WorkloadSpec(users=2000, triggers=200), reset=True)
    run_id = f"manual__faults_{uuid.uuid4().hex[:8]}"
    scheduled.trigger(run_id, conf={"batch_size": 2000})
    wait_idle(scheduled, pg)

    assert marker.read_text() == "before_write"  # a batch task process did SIGKILL itself
    killed = scheduled.query(
        "SELECT run_id, task_id, map_index, try_number, state FROM task_instance_history"
        " WHERE dag_id = %(d)s AND task_id LIKE 'process_%%'", {"d": DAG_ID})
    assert len(killed) == 1 and killed[0]["state"] in ("failed", "up_for_retry"), killed
    retried = scheduled.query(
        "SELECT state, try_number FROM task_instance WHERE dag_id = %(d)s AND run_id = %(r)s"
        " AND task_id = %(t)s AND map_index = %(m)s",
        {"d": DAG_ID, "r": killed[0]["run_id"], "t": killed[0]["task_id"], "m": killed[0]["map_index"]})
    assert retried == [{"state": "success", "try_number": 2}], retried
    assert {r["state"] for r in scheduled.runs()} == {"success"}
    assert scalar(pg, "SELECT count(*) FROM notification_triggers WHERE status = 'done'") == 200
    assert scalar(pg, "SELECT max(attempts) FROM notification_triggers") == 2
    settle(pg, settings_of(scheduled), "task process SIGKILLed under the scheduler",
           "a process_* task SIGKILLs its own process after its decisions, before its writes, under a real "
           "scheduler with scheduled runs on; Airflow retries it", triggers=200)


def test_backfill_redrives_a_failed_window_with_scheduled_runs_on(pg, scheduled):
    # A past window; its run already happened (made here by a first backfill, as the schedule would).
    day = (datetime.now(UTC) - timedelta(days=1)).replace(hour=10, minute=0, second=0, microsecond=0)
    start, end = day, day + timedelta(minutes=2)
    users = list(range(910_001, 910_011))
    f.add_users(pg, users)
    f.add_favorites(pg, users, "item", 910_555)
    def at(seconds: int) -> str:
        return (start + timedelta(seconds=seconds)).isoformat()

    window = [f.add_trigger(pg, "flash_sale", entity=("item", 910_555), created_at=at(s)) for s in (5, 65, 119)]
    outside = f.add_trigger(pg, "flash_sale", user_id=users[0], created_at=at(121))
    delivered = f.add_trigger(pg, "price_drop", entity=("item", 910_555), created_at=at(30))
    scheduled.trigger(f"manual__faults_{uuid.uuid4().hex[:8]}")  # sooner than the next scheduled run
    wait_idle(scheduled, pg)  # all processed: flash_sale has no template yet
    assert {f.trigger(pg, t)["status"] for t in [*window, outside]} == {"failed"}
    before_delivered = f.notifications_of(pg, delivered)
    assert before_delivered == users

    def backfill(behavior: str) -> list[dict]:
        known = {r["run_id"] for r in scheduled.runs()}
        cleared = {r["run_id"]: r for r in scheduled.runs()}
        # The dates select runs by the time they run: the run of [start, end) runs at `end`.
        scheduled.airflow("backfill", "create", "--dag-id", DAG_ID, "--from-date", end.isoformat(),
                          "--to-date", end.isoformat(), "--reprocess-behavior", behavior)
        def done():
            runs = [r for r in scheduled.runs() if r["backfill_id"] is not None
                    and (r["run_id"] not in known or cleared[r["run_id"]]["state"] != r["state"]
                         or cleared[r["run_id"]]["backfill_id"] != r["backfill_id"])]
            return runs if runs and all(r["state"] in ("success", "failed") for r in runs) else None
        runs = scheduled.wait_for(done, RUN_TIMEOUT_SECONDS, f"the {behavior} backfill's runs")
        scheduled.wait_for(  # the scheduler closes a backfill a loop after its last run: one at a time
            lambda: not scheduled.query("SELECT id FROM backfill WHERE completed_at IS NULL"),
            RUN_TIMEOUT_SECONDS, "the backfill to be marked complete")
        return runs

    (first,) = backfill("none")  # the window's run, as the schedule would have made it
    assert (first["data_interval_start"], first["data_interval_end"]) == (start, end)
    assert {f.trigger(pg, t)["status"] for t in window} == {"failed"}

    # The operator adds the missing template and backfills the window that already has a run.
    pg.execute("INSERT INTO notification_templates (trigger_type, title_template, body_template)"
               " VALUES ('flash_sale', 'Flash sale: {{ item_name }}', '{{ item_name }} now {{ new_price }}.')")
    (rerun,) = backfill("completed")
    assert rerun["run_id"] == first["run_id"] and rerun["state"] == "success" and rerun["run_type"] == "backfill"
    claim_id = f"{rerun['run_id']}#1"
    mode, counts = pg.execute("SELECT mode, counts FROM herald_runs WHERE run_id = %s", (claim_id,)).fetchone()
    assert mode == "backfill" and counts["triggers_done"] == 3 and counts["delivered"] == 30
    assert scalar(pg, "SELECT count(*) FROM herald_runs WHERE run_id = %s", (first["run_id"],)) == 1  # kept
    for t in window:
        row = f.trigger(pg, t)
        assert (row["status"], row["claimed_by"], row["last_error"]) == ("done", claim_id, None), row
        assert f.notifications_of(pg, t) == users
    assert f.trigger(pg, outside)["status"] == "failed"  # not in the window
    assert f.notifications_of(pg, delivered) == before_delivered  # nothing twice
    wait_idle(scheduled, pg)
    settle(pg, settings_of(scheduled), "backfill of a failed window, scheduled runs on",
           "three triggers failed for a missing template in a window that already had its run; template "
           "added; `airflow backfill create ... --reprocess-behavior completed` with the schedule running",
           triggers=5)
