"""notification_batch under a REAL Airflow deployment: api-server + scheduler (LocalExecutor) + dag-processor.

The processes run for the whole module, in process groups of their own, on a PostgreSQL metadata DB
created for it (``herald_test_af_<pid>``), and are stopped by process group id and the DB dropped at
the end, whatever happened. The scheduler (and so every LocalExecutor worker) runs with the fault hook
``HERALD_FAULT_ONCE=before_write:<marker>``: the first batch task that reaches its write raises once.

Scheduled runs are off (``[scheduler] use_job_schedule = False``): each test creates its own runs
(a manual trigger, a backfill), so a cron run never races the test's run for the same triggers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from herald import services
from herald.config import DAG_ID, POOL_NORMAL, POOL_URGENT, QUEUE_URGENT
from herald.workload import WorkloadSpec, seed
from tests import factories as f
from tests.e2e.airflow_procs import Cluster, deployment

pytestmark = pytest.mark.slow

RUN_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def cluster(found_services: services.Services, db_url: str, redis_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("airflow_home_scheduler")
    marker = home / "fault_marker"
    with deployment(found_services, db_url, redis_url, home, name="scheduler",
                    scheduler_env={"HERALD_FAULT_ONCE": f"before_write:{marker}"}) as cluster:
        yield cluster


def fault_marker(cluster: Cluster) -> Path:
    return Path(cluster.scheduler_env["HERALD_FAULT_ONCE"].split(":", 1)[1])


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def assert_exactly_once(pg) -> None:
    """No duplicate (trigger, user) and exactly one outcome per (trigger, recipient) of every done trigger."""
    assert scalar(pg, "SELECT count(*) FROM (SELECT trigger_id, user_id FROM notifications"
                      " WHERE trigger_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1) d") == 0
    assert scalar(pg, "SELECT count(*) FROM (SELECT trigger_id, user_id FROM trigger_recipient_outcomes"
                      " GROUP BY 1, 2 HAVING count(*) > 1) d") == 0
    assert scalar(
        pg, "SELECT count(*) FROM notification_triggers t WHERE t.status = 'done' AND t.recipient_count <>"
            " (SELECT count(*) FROM trigger_recipient_outcomes o WHERE o.trigger_id = t.id)") == 0


def test_scheduler_runs_batches_in_their_pools_and_retries_a_failed_batch(pg, cluster):
    seed(pg, WorkloadSpec(users=3000, triggers=300), reset=True)
    marker = fault_marker(cluster)
    assert not marker.exists()

    run_id = f"manual__herald_e2e_{uuid.uuid4().hex[:8]}"
    cluster.trigger(run_id, conf={"batch_size": 1000})
    states = cluster.wait_for_runs([run_id], RUN_TIMEOUT_SECONDS)
    tis = cluster.task_instances(run_id)
    assert states[run_id] == "success", f"{tis}\n{cluster.logs()}"

    # The claim recorded its batches; one mapped task instance per batch, each in its priority's pool.
    batches = scalar(pg, "SELECT batches FROM herald_runs WHERE run_id = %s", (run_id,))
    urgent_batches = [b for b in batches if b["priority"] == "urgent"]
    normal_batches = [b for b in batches if b["priority"] == "normal"]
    assert len(urgent_batches) >= 1 and len(normal_batches) >= 4, batches
    by_task: dict[str, list[dict]] = {}
    for ti in tis:
        by_task.setdefault(ti["task_id"], []).append(ti)
    assert sorted(by_task) == ["claim", "finalize", "normal_batches", "process_normal", "process_urgent",
                               "urgent_batches", "watcher"]
    # The watcher leaf only runs (and fails the run) when a task failed for good.
    assert [ti["state"] for ti in by_task.pop("watcher")] == ["skipped"]
    assert all(ti["state"] == "success" for group in by_task.values() for ti in group), tis

    urgent = by_task["process_urgent"]
    assert [ti["map_index"] for ti in urgent] == list(range(len(urgent_batches)))
    assert {ti["pool"] for ti in urgent} == {POOL_URGENT}
    assert {ti["queue"] for ti in urgent} == {QUEUE_URGENT}
    assert {ti["priority_weight"] for ti in urgent} == {100}
    assert [ti["rendered_map_index"] for ti in urgent] == [b["label"] for b in urgent_batches]
    assert all(ti["rendered_map_index"].startswith("urgent · ") for ti in urgent)

    normal = by_task["process_normal"]
    assert [ti["map_index"] for ti in normal] == list(range(len(normal_batches)))
    assert {ti["pool"] for ti in normal} == {POOL_NORMAL}
    assert [ti["rendered_map_index"] for ti in normal] == [b["label"] for b in normal_batches]
    assert {ti["pool"] for ti in by_task["claim"] + by_task["finalize"]} == {"default_pool"}

    # The injected fault failed a batch task once; the scheduler retried it and the retry succeeded.
    assert marker.read_text() == "before_write"
    process_tis = urgent + normal
    retried = [ti for ti in process_tis if ti["try_number"] == 2]
    assert len(retried) >= 1, process_tis
    assert all(ti["try_number"] in (1, 2) for ti in process_tis), process_tis
    others = [ti for ti in tis if ti not in process_tis and ti["task_id"] != "watcher"]  # skipped: never tried
    assert all(ti["try_number"] == 1 for ti in others), tis
    history = cluster.task_failures(run_id)
    assert {(h["task_id"], h["map_index"], h["try_number"]) for h in history} == {
        (ti["task_id"], ti["map_index"], 1) for ti in retried}, history
    assert {h["state"] for h in history} <= {"failed", "up_for_retry"}, history

    # Every trigger done, exactly once, and the run recorded with the notifications it delivered.
    statuses = dict(pg.execute(
        "SELECT status, count(*) FROM notification_triggers GROUP BY status").fetchall())
    assert statuses == {"done": 300}, statuses
    assert scalar(pg, "SELECT count(DISTINCT claimed_by) FROM notification_triggers") == 1
    assert scalar(pg, "SELECT min(claimed_by) FROM notification_triggers") == run_id
    assert_exactly_once(pg)
    notifications = scalar(pg, "SELECT count(*) FROM notifications WHERE trigger_id IS NOT NULL")
    recipients = scalar(pg, "SELECT sum(recipient_count) FROM notification_triggers")
    assert recipients == scalar(
        pg, "SELECT count(*) FROM notification_triggers t JOIN user_favorites f"
            " ON (f.entity_type, f.entity_id) = (t.entity_type, t.entity_id)") > 5000
    assert scalar(pg, "SELECT count(*) FROM trigger_recipient_outcomes") == recipients
    mode, counts, finished = pg.execute(
        "SELECT mode, counts, finished_at FROM herald_runs WHERE run_id = %s", (run_id,)).fetchone()
    assert mode == "manual" and finished is not None
    assert counts["delivered"] == notifications > 0
    assert counts["triggers_done"] == 300 and counts["recipients"] == recipients


def test_backfill_redrives_failed_triggers_of_its_window_only(pg, cluster):
    # A past two-minute window: [yesterday 10:00, yesterday 10:02) UTC.
    day = (datetime.now(UTC) - timedelta(days=1)).replace(hour=10, minute=0, second=0, microsecond=0)
    start, end = day, day + timedelta(minutes=2)
    # Ids the workload of the test before never used: its users' rate-limit counters and its cached
    # favorites and preferences (same Redis namespace, minutes-long TTLs) must not leak into this test.
    users = list(range(900_001, 900_011))
    item = ("item", 900_555)
    f.add_users(pg, users)
    f.add_favorites(pg, users, *item)

    def at(delta: timedelta) -> str:
        return (start + delta).isoformat()

    fanout = f.add_trigger(pg, "flash_sale", entity=item, created_at=at(timedelta(seconds=30)))
    direct = f.add_trigger(pg, "flash_sale", user_id=users[0], created_at=at(timedelta(seconds=70)))
    delivered = f.add_trigger(pg, "price_drop", entity=item, created_at=at(timedelta(seconds=90)))
    just_after = f.add_trigger(pg, "flash_sale", entity=item, created_at=at(timedelta(minutes=2)))
    before = f.add_trigger(pg, "flash_sale", user_id=users[1], created_at=at(timedelta(seconds=-60)))

    # First a normal run: the unknown trigger type fails four triggers; the price drop is delivered.
    first = f"manual__herald_e2e_{uuid.uuid4().hex[:8]}"
    cluster.trigger(first)
    first_state = cluster.wait_for_runs([first], RUN_TIMEOUT_SECONDS)[first]
    assert first_state == "success", cluster.task_instances(first)
    for trigger_id in (fanout, direct, just_after, before):
        row = f.trigger(pg, trigger_id)
        assert row["status"] == "failed" and "unknown trigger_type 'flash_sale'" in row["last_error"], row
    delivered_row = f.trigger(pg, delivered)
    assert delivered_row["status"] == "done"
    delivered_ids = pg.execute(
        "SELECT id FROM notifications WHERE trigger_id = %s ORDER BY id", (delivered,)).fetchall()
    assert f.notifications_of(pg, delivered) == users

    # The operator adds the missing template, then backfills the window.
    pg.execute(
        "INSERT INTO notification_templates (trigger_type, title_template, body_template)"
        " VALUES ('flash_sale', 'Flash sale: {{ item_name }}', '{{ item_name }} now {{ new_price }}.')")
    before_backfill = {r["run_id"] for r in cluster.runs()}
    cluster.airflow("backfill", "create", "--dag-id", DAG_ID, "--from-date", end.isoformat(),
                    "--to-date", end.isoformat(), "--reprocess-behavior", "none")
    backfill_runs = cluster.wait_for(
        lambda: [r for r in cluster.runs() if r["run_id"] not in before_backfill], 60,
        "the backfill to create its runs")
    run_ids = [r["run_id"] for r in backfill_runs]
    states = cluster.wait_for_runs(run_ids, RUN_TIMEOUT_SECONDS)
    assert set(states.values()) == {"success"}, (states, [cluster.task_instances(r) for r in run_ids])

    # One backfill run, whose data interval is exactly the window.
    runs = [r for r in cluster.runs() if r["run_id"] in run_ids]
    assert len(runs) == 1, runs
    (run,) = runs
    assert run["run_type"] == "backfill" and run["backfill_id"] is not None
    assert (run["data_interval_start"], run["data_interval_end"]) == (start, end)
    mode, triggers, counts = pg.execute(
        "SELECT mode, triggers, counts FROM herald_runs WHERE run_id = %s", (run["run_id"],)).fetchone()
    assert (mode, triggers) == ("backfill", 2)
    assert counts["triggers_done"] == 2 and counts["delivered"] == len(users) + 1

    # The failed triggers of the window are now done and delivered ...
    for trigger_id in (fanout, direct):
        row = f.trigger(pg, trigger_id)
        assert row["status"] == "done" and row["last_error"] is None, row
        assert row["claimed_by"] == run["run_id"], row
    assert f.notifications_of(pg, fanout) == users
    assert f.notifications_of(pg, direct) == [users[0]]
    titles = pg.execute(
        "SELECT DISTINCT title FROM notifications WHERE trigger_id = %s", (fanout,)).fetchall()
    assert titles == [("Flash sale: Lamp",)]
    # ... the one already delivered was left alone (no duplicates) ...
    assert f.trigger(pg, delivered) == delivered_row
    assert pg.execute("SELECT id FROM notifications WHERE trigger_id = %s ORDER BY id",
                      (delivered,)).fetchall() == delivered_ids
    # ... and the failed ones outside the window stay failed.
    for trigger_id in (just_after, before):
        row = f.trigger(pg, trigger_id)
        assert row["status"] == "failed" and "flash_sale" in row["last_error"], row
        assert f.notifications_of(pg, trigger_id) == []
    assert_exactly_once(pg)
