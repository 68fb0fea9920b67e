"""``herald up --executor celery`` with real processes: the urgent lane, lost workers, metrics, Sentry, Ctrl-C.

One topology for the whole module (api-server, scheduler, dag-processor, triggerer, an ``urgent``-only
and a ``default`` Celery worker, under herald's supervisor), started by the real command with
``SENTRY_DSN`` pointing at an HTTP endpoint this module owns, ``HERALD_STATSD`` at a UDP socket it owns,
and ``HERALD_FAULT_ONCE=before_write:<marker>`` (the first batch that reaches its write raises once).
Scheduled runs are off: each test triggers its own run. The tests run in file order; the last one stops
the command with Ctrl-C and checks that nothing is left.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

import psutil
import psycopg
import pytest
import redis

from herald import services, verify
from herald.config import DAG_ID, POOL_NORMAL, Settings
from herald.processes import free_port
from herald.workload import WorkloadSpec, seed
from tests import factories as f
from tests.e2e.airflow_procs import ARTIFACTS
from tests.e2e.browser import ARTIFACTS as SHOTS
from tests.e2e.browser import DOCS_SCREENSHOT_CELERY, sign_in
from tests.e2e.celery_up import (
    HeraldUp,
    SentryEndpoint,
    StatsdListener,
    answers,
    listening_ports,
    start_herald_up,
    still_running,
)
from tests.e2e.test_scheduler import assert_exactly_once, scalar

pytestmark = pytest.mark.slow

RUN_TIMEOUT_SECONDS = 300
HOST = socket.gethostname()
URGENT_WORKER, DEFAULT_WORKER = f"urgent@{HOST}", f"default@{HOST}"
#: Every metric of the README's table.
COUNTERS = ("triggers.claimed", "triggers.done", "triggers.failed", "notifications.delivered",
            "notifications.skipped_preference", "notifications.rate_limited", "notifications.failed",
            "digests.sent", "claims.released", "redis.fallbacks")


@pytest.fixture(scope="module")
def listeners() -> Iterator[tuple[StatsdListener, SentryEndpoint]]:
    statsd, sentry = StatsdListener(), SentryEndpoint()
    yield statsd, sentry
    statsd.close()
    sentry.close()


@pytest.fixture(scope="module")
def up(found_services: services.Services, db_url: str, redis_url: str, listeners,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldUp]:
    statsd, sentry = listeners
    metadata_db = f"herald_test_celery_{os.getpid()}"
    metadata_url = services.create_database(found_services.database_url, metadata_db, drop_first=True)
    home = tmp_path_factory.mktemp("airflow_home_celery")
    tag = uuid.uuid4().hex[:10]
    key_prefix, namespace = f"herald-e2e-{tag}:celery:", f"herald-e2e-{tag}:v1"
    log_dir = ARTIFACTS / "celery"
    shutil.rmtree(log_dir, ignore_errors=True)
    extra = {
        "SENTRY_DSN": sentry.dsn,
        "HERALD_STATSD": f"127.0.0.1:{statsd.port}",
        "HERALD_FAULT_ONCE": f"before_write:{home / 'fault_marker'}",
    }
    try:
        with start_herald_up(home=home, db_url=db_url, redis_url=redis_url, metadata_db=metadata_db,
                             metadata_url=metadata_url, api_port=free_port(), key_prefix=key_prefix,
                             namespace=namespace, log_dir=log_dir, extra=extra) as running:
            running.wait_for_dag(DAG_ID)
            yield running
            for name in ("worker-urgent", "worker-default", "scheduler", "api-server"):
                src = running.component_log(name)
                if src.exists():
                    shutil.copyfile(src, log_dir / f"{name}.log")
    finally:
        services.drop_database(found_services.database_url, metadata_db)
        client = redis.Redis.from_url(redis_url)
        for pattern in (f"{key_prefix}*", f"{namespace}:*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
        client.close()


def trigger(up: HeraldUp, conf: dict | None = None) -> str:
    run_id = f"manual__celery_{uuid.uuid4().hex[:8]}"
    up.trigger(run_id, conf=conf)
    return run_id


def ti_state(up: HeraldUp, run_id: str, task_id: str) -> list[str]:
    return [r["state"] for r in up.query(
        "SELECT state FROM task_instance WHERE run_id = %(r)s AND task_id = %(t)s ORDER BY map_index",
        {"r": run_id, "t": task_id})]


def assert_ran_on(up: HeraldUp, run_id: str, task_id: str, worker: str, other: str) -> int:
    """Every try of ``task_id`` appears in ``worker``'s own log (by Celery task id) and never in ``other``'s."""
    mine, theirs = up.workloads(worker), up.workloads(other)
    tries = up.executed_tries(run_id, task_id)
    assert tries, f"no tries of {task_id}"
    for t in tries:
        record = mine.get(t["external_executor_id"])
        assert record is not None, f"{task_id}[{t['map_index']}] try {t['try_number']} not in {worker}'s log"
        assert (record["task_id"], record["run_id"], record["map_index"], record["try_number"]) == (
            task_id, run_id, t["map_index"], t["try_number"]), record
        assert t["external_executor_id"] not in theirs
    assert not [w for w in theirs.values() if w["run_id"] == run_id and w["task_id"] == task_id]
    return len(tries)


def assert_all_ended(pg) -> None:
    statuses = dict(pg.execute("SELECT status, count(*) FROM notification_triggers GROUP BY 1").fetchall())
    assert set(statuses) <= {"done", "failed"}, statuses


# ------------------------------------------------------------------------------------------ the tests


def test_batches_run_on_their_own_workers_with_metrics_and_sentry(pg, up: HeraldUp, listeners) -> None:
    statsd, sentry = listeners
    seed(pg, WorkloadSpec(users=2000, triggers=200), reset=True)
    poison = f.add_trigger(pg, "flash_sale", entity=("item", 5))  # unknown type: fails, alone
    ghost = f.add_trigger(pg, "security_alert", user_id=999_999, priority="urgent")  # no such user
    up.airflow("variables", "set", "herald_rate_limit", "2")  # some recipients are rate-limited
    started = time.time()
    try:
        run_id = trigger(up, {"batch_size": 3000})
        states = up.wait_for_runs([run_id], RUN_TIMEOUT_SECONDS)
    finally:
        up.airflow("variables", "set", "herald_rate_limit", "20")
    assert states[run_id] == "success", f"{up.task_instances(run_id)}\n{up.logs()}"
    elapsed = time.time() - started

    # Routing, by the workers' own records: each try's Celery task id is in that worker's log.
    urgent_tries = assert_ran_on(up, run_id, "process_urgent", "worker-urgent", "worker-default")
    normal_tries = assert_ran_on(up, run_id, "process_normal", "worker-default", "worker-urgent")
    for task_id in ("claim", "urgent_batches", "normal_batches", "finalize"):
        assert_ran_on(up, run_id, task_id, "worker-default", "worker-urgent")
    assert {t["queue"] for t in up.executed_tries(run_id, "process_urgent")} == {"urgent"}
    assert {t["queue"] for t in up.executed_tries(run_id, "process_normal")} == {"default"}

    # The injected fault failed one batch once; Airflow retried it and the retry succeeded.
    failed_tries = [(task, t) for task in ("process_urgent", "process_normal")
                    for t in up.executed_tries(run_id, task) if t["try_number"] == 1 and t["state"] != "success"]
    assert len(failed_tries) == 1, failed_tries
    (failed_task, failed_try), = failed_tries

    batches = scalar(pg, "SELECT batches FROM herald_runs WHERE run_id = %s", (run_id,))
    counts, claimed = pg.execute("SELECT counts, triggers FROM herald_runs WHERE run_id = %s", (run_id,)).fetchone()
    n_urgent = sum(b["priority"] == "urgent" for b in batches)
    assert n_urgent >= 1 and len(batches) - n_urgent >= 2, batches
    assert (urgent_tries, normal_tries) == (n_urgent + (failed_task == "process_urgent"),
                                            len(batches) - n_urgent + (failed_task == "process_normal"))
    assert f.trigger(pg, poison)["status"] == "failed" and f.trigger(pg, ghost)["status"] == "failed"
    assert_all_ended(pg)
    assert_exactly_once(pg)

    # Metrics: every herald.* metric of the README arrived, with the run's own numbers.
    time.sleep(2)  # UDP: let the last datagrams land
    received = statsd.since(started, "airflow.herald.")
    sums: dict[str, float] = {}
    for name, value, kind in received:
        if kind == "c":
            sums[name.removeprefix("airflow.herald.")] = sums.get(name.removeprefix("airflow.herald."), 0) + value
    assert set(COUNTERS) <= set(sums), sorted(sums)
    finalize = up.query("SELECT value FROM xcom WHERE run_id = %(r)s AND task_id = 'finalize'"
                        " AND key = 'return_value'", {"r": run_id})[0]["value"]
    expected = {
        "triggers.claimed": claimed,
        "triggers.done": counts["triggers_done"],
        "triggers.failed": counts["triggers_failed"],
        "notifications.delivered": counts["delivered"],
        "notifications.skipped_preference": counts["skipped_preference"],
        "notifications.rate_limited": counts["rate_limited"],
        "notifications.failed": counts["failed"],
        "digests.sent": finalize["digests"],
        "claims.released": finalize["released"],
        "redis.fallbacks": 0,
    }
    assert {k: sums[k] for k in COUNTERS} == expected
    assert counts["delivered"] > 0 and counts["skipped_preference"] > 0 and counts["rate_limited"] > 0
    assert counts["triggers_failed"] == 2 and claimed == 202
    assert counts["delivered"] == scalar(pg, "SELECT count(*) FROM notifications WHERE trigger_id IS NOT NULL")
    timers = [v for name, v, kind in received if name == "airflow.herald.batch.duration" and kind == "ms"]
    assert len(timers) == len(batches) and all(v > 0 for v in timers), timers
    gauges = [v for name, v, kind in received if name == "airflow.herald.run.batches" and kind == "g"]
    assert gauges == [len(batches)]

    # Sentry: the failed try's error arrived, with the task's identity and no payload or personal data.
    events = sentry.events(started)
    assert len(events) == 1, [e["exception"]["values"][-1]["value"] for e, _ in events]
    event, raw = events[0]
    error = event["exception"]["values"][-1]
    assert error["type"] == "RuntimeError" and "injected fault at before_write" in error["value"]
    tags = event["tags"]
    assert (tags["dag_id"], tags["task_id"], str(tags["try_number"])) == (DAG_ID, failed_task, "1"), tags
    frames = [fr for v in event["exception"]["values"] for fr in (v.get("stacktrace") or {}).get("frames", [])]
    assert frames and not [fr for fr in frames if fr.get("vars")], "local variables were sent"
    assert not (event.get("breadcrumbs") or {}).get("values"), event.get("breadcrumbs")
    assert "user" not in event and "request" not in event
    text = raw.decode(errors="replace")
    for secret in ("@example.test", "Item 1", "39.00", "event_name", "Lamp", up.env["AIRFLOW__API_AUTH__JWT_SECRET"],
                   up.password):
        assert secret not in text, f"{secret!r} reached Sentry"
    print(f"\nrouting/metrics/sentry run: {len(batches)} batches ({n_urgent} urgent), {elapsed:.1f}s")


def test_urgent_batch_starts_while_the_normal_pool_is_full(pg, up: HeraldUp) -> None:
    """Normal batches hold every slot of their pool (2 here) and more wait for it; an urgent batch made
    then (the run's urgent batch, cleared to run again) starts at once on the urgent worker."""
    import httpx

    seed(pg, WorkloadSpec(users=2000, triggers=200), reset=True)
    up.airflow("pools", "set", POOL_NORMAL, "2", "herald normal notification batches (test: 2 slots)")
    blocker = psycopg.connect(up.env["DATABASE_URL"])
    try:
        run_id = trigger(up, {"batch_size": 600})  # 6 or so normal batches, 1 urgent
        up.wait_for(lambda: ti_state(up, run_id, "claim") == ["success"], 120, "the claim")
        # Normal batches stop at their first write to their own triggers: running, each holding a slot.
        blocker.execute("SELECT id FROM notification_triggers WHERE claimed_by = %s AND priority = 'normal'"
                        " FOR SHARE", (run_id,))

        def normal_lane() -> tuple[list, list]:
            normal = up.query("SELECT map_index, state, start_date FROM task_instance WHERE run_id = %(r)s"
                              " AND task_id = 'process_normal'", {"r": run_id})
            running = [t for t in normal if t["state"] == "running"]
            waiting = [t for t in normal if t["start_date"] is None]
            return running, waiting

        def pool_full() -> bool:
            running, waiting = normal_lane()
            urgent = ti_state(up, run_id, "process_urgent")
            return len(running) == 2 and len(waiting) >= 2 and bool(urgent) and set(urgent) == {"success"}

        up.wait_for(pool_full, 180, "two normal batches running (pool full), more waiting, urgent done")
        cleared = time.time()
        response = httpx.post(
            f"{up.api_url}/api/v2/dags/{DAG_ID}/clearTaskInstances",
            headers={"Authorization": f"Bearer {up.token()}"},
            json={"dry_run": False, "dag_run_id": run_id, "task_ids": ["process_urgent"], "only_failed": False,
                  "reset_dag_runs": False, "include_downstream": False, "include_upstream": False},
            timeout=30)
        assert response.status_code == 200, response.text

        def urgent_again() -> list | None:
            rows = up.query("SELECT start_date, end_date, state, try_number FROM task_instance WHERE run_id = %(r)s"
                            " AND task_id = 'process_urgent'", {"r": run_id})
            return rows if rows and all(r["try_number"] == 2 and r["state"] == "success" for r in rows) else None

        urgent = up.wait_for(urgent_again, 120, "the cleared urgent batch to run again")
        waits = [r["start_date"].timestamp() - cleared for r in urgent]
        running, waiting = normal_lane()
        assert len(running) == 2 and len(waiting) >= 2, (running, waiting)  # the normal lane is still full
        assert max(waits) < 15, waits  # the urgent batch did not wait for it
        stats = up.stats()["executor"]
        queues = {q["name"]: q for q in stats["queues"]}
        assert stats["has_queues"] and queues["urgent"]["workers"] == [URGENT_WORKER]
        assert queues["default"]["workers"] == [DEFAULT_WORKER]
        print(f"\nurgent batch started {max(waits):.1f}s after it was made, with the normal pool full "
              f"and {len(waiting)} normal batches waiting")
    finally:
        blocker.rollback()
        blocker.close()
        up.airflow("pools", "set", POOL_NORMAL, "8", "herald normal notification batches")
    assert up.wait_for_runs([run_id], RUN_TIMEOUT_SECONDS)[run_id] == "success"
    assert_ran_on(up, run_id, "process_urgent", "worker-urgent", "worker-default")
    assert_all_ended(pg)
    assert_exactly_once(pg)


def test_monitoring_shows_urgent_work_waiting_without_a_worker(db_url: str, up: HeraldUp, browser) -> None:
    """The urgent worker stops consuming (a Celery remote-control command): urgent work waits in the
    broker, and the page and the API say so. Earlier tests' runs stay in the history (no truncation)."""
    from celery import Celery

    app = Celery(broker=up.env["AIRFLOW__CELERY__BROKER_URL"], broker_transport_options={
        "global_keyprefix": up.env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX"]})
    pg = psycopg.connect(db_url, autocommit=True)
    for entity in range(1, 11):  # urgent triggers only
        f.add_trigger(pg, "event_reminder", entity=("item", entity), priority="urgent")
    replies = app.control.cancel_consumer("urgent", destination=[URGENT_WORKER], reply=True, timeout=5)
    assert replies and URGENT_WORKER in replies[0], replies
    try:
        run_id = trigger(up)

        def urgent_waiting() -> dict | None:
            ex = up.stats()["executor"]
            urgent = {q["name"]: q for q in ex["queues"]}["urgent"]
            if urgent["waiting_in_broker"] and (urgent["oldest_queued_age_seconds"] or 0) >= 3:
                return ex
            return None

        ex = up.wait_for(urgent_waiting, 120, "urgent work to wait in the broker")
        queues = {q["name"]: q for q in ex["queues"]}
        queued = up.query("SELECT count(*) AS n FROM task_instance WHERE run_id = %(r)s AND state = 'queued'"
                          " AND queue = 'urgent'", {"r": run_id})[0]["n"]
        assert queues["urgent"]["workers"] == []
        assert queues["urgent"]["waiting_in_broker"] == queues["urgent"]["queued_task_instances"] == queued >= 1
        assert queues["default"]["workers"] == [DEFAULT_WORKER]
        assert queues["default"]["oldest_queued_age_seconds"] is None

        sign_in(browser, up)
        browser("Page.enable")
        browser("Page.navigate", url=f"{up.api_url}/plugin/herald")
        shown = browser.wait_for(
            "(() => { const f = document.querySelector('iframe'); const d = f && f.contentDocument;"
            " const row = d && d.getElementById('queue-urgent');"
            " return row && d.body.dataset.state === 'ok' ? row.innerText : null; })()")
        assert "none: nothing consumes this queue" in shown, shown
        time.sleep(0.5)
        shot = browser.screenshot(SHOTS / "notifications-celery-queues.png")
        if os.environ.get("HERALD_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, DOCS_SCREENSHOT_CELERY)
    finally:
        app.control.add_consumer("urgent", destination=[URGENT_WORKER], reply=True, timeout=5)
        app.close()
    assert up.wait_for_runs([run_id], RUN_TIMEOUT_SECONDS)[run_id] == "success"
    assert_ran_on(up, run_id, "process_urgent", "worker-urgent", "worker-default")
    assert_all_ended(pg)
    assert_exactly_once(pg)
    pg.close()


def test_sigkill_of_the_default_worker_mid_batch_loses_and_duplicates_nothing(pg, up: HeraldUp) -> None:
    # Normal triggers only: an urgent batch (of this run or of the urgent lane, on the other worker)
    # would hold users' rate-limit locks while blocked, and the default worker's batch would wait there.
    seed(pg, WorkloadSpec(users=2000, triggers=200, urgent_every=10**9), reset=True)
    old_pid = up.component_pid("worker-default")
    locker = psycopg.connect(up.env["DATABASE_URL"])
    locker.execute("LOCK TABLE notifications IN EXCLUSIVE MODE")  # every batch stops at its INSERT
    try:
        run_id = trigger(up, {"batch_size": 3000})
        worker_tree = lambda: [psutil.Process(old_pid), *psutil.Process(old_pid).children(recursive=True)]  # noqa: E731

        def batch_blocked_mid_transaction() -> list | None:
            # (not through `locker`: inside a transaction, pg_stat_activity is a snapshot taken once)
            # (any lock wait, not only on `notifications`: whatever a batch waits for, it is mid-batch)
            waiting = {r[0] for r in pg.execute(
                "SELECT client_port FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()")}
            ours = []
            for p in worker_tree():
                try:
                    ours += [p for c in p.net_connections(kind="tcp") if c.laddr.port in waiting]
                except psutil.Error:
                    continue
            return ours or None

        up.wait_for(batch_blocked_mid_transaction, 120, "a batch of the default worker blocked mid-transaction")
        tree = worker_tree()
        killed_at = time.monotonic()
        for p in tree:  # the whole worker at once, as when its machine dies
            try:
                p.kill()
            except psutil.Error:
                pass
    finally:
        locker.rollback()
        locker.close()
    up.wait_for(lambda: (up.component_pid("worker-default") or old_pid) != old_pid, 60,
                "the supervisor to restart the default worker")
    # The batch killed is this run's, unless a scheduled run claimed the triggers first: check every
    # run that claimed them (claim ids are run ids, with "#<clear number>" after a clear).
    claimers = sorted({r[0].split("#")[0] for r in pg.execute(
        "SELECT DISTINCT claimed_by FROM notification_triggers WHERE claimed_by IS NOT NULL")} | {run_id})
    states = up.wait_for_runs(claimers, RUN_TIMEOUT_SECONDS)
    recovered = time.monotonic() - killed_at
    assert set(states.values()) == {"success"}, f"{states}\n{up.task_instances(run_id)}\n{up.logs()}"
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    tries = {r: up.executed_tries(r, "process_normal") for r in claimers}
    lost = [(r, t) for r in claimers for t in tries[r] if t["try_number"] == 1 and t["state"] != "success"]
    assert lost, tries  # the killed batch's try failed (its heartbeat stopped) ...
    for r, t in lost:  # ... and was retried, successfully, by the restarted worker
        retry = [x for x in tries[r] if x["map_index"] == t["map_index"] and x["try_number"] == 2]
        assert [x["state"] for x in retry] == ["success"], tries
    for r in claimers:
        if tries[r]:  # (a run that found the triggers claimed already has no batch)
            assert_ran_on(up, r, "process_normal", "worker-default", "worker-urgent")
    assert_all_ended(pg)
    assert_exactly_once(pg)
    recipients = scalar(pg, "SELECT sum(recipient_count) FROM notification_triggers")
    assert scalar(pg, "SELECT count(*) FROM trigger_recipient_outcomes") == recipients
    report = verify.verify(pg, Settings())  # every check of the guarantees: 0 lost, 0 duplicated, ...
    assert report.ok, report.describe()
    print(f"\nworker killed mid-batch: run succeeded {recovered:.1f}s later")


def test_ctrl_c_leaves_no_process_and_no_open_port(up: HeraldUp) -> None:
    tree = up.tree()
    snapshot = [(p.pid, p.create_time(), p.name()) for p in tree]
    ports = listening_ports(tree)
    assert ("127.0.0.1", up.api_port) in ports
    assert all(ip == "127.0.0.1" for ip, _ in ports), ports  # nothing listens beyond this machine
    assert len(snapshot) >= 8  # herald up, supervisor, 6 components (and their children)
    started = time.monotonic()
    up.interrupt()
    assert up.process.wait(180) == 0
    took = time.monotonic() - started
    assert still_running(snapshot) == []
    assert not [port for _, port in ports if answers(port)]
    state = up.state()
    assert state["stopping"] and all(c["pid"] is None for c in state["components"].values())
    print(f"\nCtrl-C: {len(snapshot)} processes and {len(ports)} listening port(s) gone in {took:.1f}s")
