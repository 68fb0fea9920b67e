"""``airflow dags test notification_batch`` as a subprocess against the real test PostgreSQL and Redis.

The whole DAG (claim, both mapped process tasks, finalize) runs in one Airflow process with a SQLite
metadata DB in a temporary ``AIRFLOW_HOME``; the notifications database is the test session's.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from herald.config import DAG_ID
from herald.workload import WorkloadSpec, seed
from tests import factories as f
from tests.e2e.airflow_procs import airflow, airflow_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory, db_url: str, redis_url: str) -> Path:
    """A temporary AIRFLOW_HOME whose SQLite metadata DB is migrated."""
    home = tmp_path_factory.mktemp("airflow_home_dags_test")
    airflow("db", "migrate", env=airflow_env(home, db_url=db_url, redis_url=redis_url, namespace="unused"))
    return home


@pytest.fixture
def dags_test(airflow_home: Path, db_url: str, redis_url: str, settings, redis_client):
    """``airflow dags test notification_batch [-c conf]``, with this test's Redis namespace."""
    env = airflow_env(airflow_home, db_url=db_url, redis_url=redis_url, namespace=settings.cache_namespace)

    def run(conf: dict | None = None, check: bool = True):
        args = ["dags", "test", DAG_ID]
        if conf is not None:
            args += ["-c", json.dumps(conf)]
        return airflow(*args, env=env, timeout=600, check=check)

    return run


def airflow_runs(home: Path) -> list[tuple[str, str, str]]:
    """(run_id, run_type, state) of every notification_batch run in the SQLite metadata DB."""
    with sqlite3.connect(home / "airflow.db") as conn:
        return conn.execute(
            "SELECT run_id, run_type, state FROM dag_run WHERE dag_id = ? ORDER BY id", (DAG_ID,)
        ).fetchall()


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def test_dags_test_delivers_every_trigger_exactly_once(pg, dags_test, airflow_home):
    seed(pg, WorkloadSpec(users=3000, triggers=300), reset=True)
    assert scalar(pg, "SELECT count(*) FROM notification_triggers WHERE status = 'pending'") == 300
    assert scalar(pg, "SELECT count(*) FROM notification_triggers WHERE priority = 'urgent'") == 30

    first = dags_test()
    assert first.returncode == 0

    statuses = dict(pg.execute(
        "SELECT status, count(*) FROM notification_triggers GROUP BY status").fetchall())
    assert statuses == {"done": 300}, statuses
    assert scalar(pg, "SELECT count(*) FROM notification_triggers WHERE claimed_by IS NULL") == 0
    assert scalar(pg, "SELECT count(*) FROM notification_triggers WHERE claim_expires_at IS NOT NULL") == 0

    # No duplicate (trigger, user), and exactly one outcome per (trigger, recipient).
    notifications = scalar(pg, "SELECT count(*) FROM notifications WHERE trigger_id IS NOT NULL")
    assert notifications == scalar(
        pg, "SELECT count(*) FROM (SELECT DISTINCT trigger_id, user_id FROM notifications"
            " WHERE trigger_id IS NOT NULL) d")
    assert scalar(pg, "SELECT count(*) FROM (SELECT trigger_id, user_id FROM trigger_recipient_outcomes"
                      " GROUP BY 1, 2 HAVING count(*) > 1) d") == 0
    outcomes = dict(pg.execute(
        "SELECT outcome, count(*) FROM trigger_recipient_outcomes GROUP BY outcome").fetchall())
    recipients = scalar(pg, "SELECT sum(recipient_count) FROM notification_triggers")
    expected_recipients = scalar(
        pg, "SELECT count(*) FROM notification_triggers t JOIN user_favorites f"
            " ON (f.entity_type, f.entity_id) = (t.entity_type, t.entity_id)")
    assert recipients == expected_recipients > 5000
    assert sum(outcomes.values()) == recipients
    assert notifications == outcomes["delivered"]
    # Exactly the favoriters who had not disabled the trigger's type were delivered (no rate limit
    # here: W1-shaped data gives nobody more than 20 in the run), and everyone else was skipped.
    enabled = scalar(
        pg, "SELECT count(*) FROM notification_triggers t JOIN user_favorites f"
            " ON (f.entity_type, f.entity_id) = (t.entity_type, t.entity_id)"
            " WHERE NOT EXISTS (SELECT 1 FROM user_notification_preferences p WHERE p.user_id = f.user_id"
            "                   AND p.notification_type = t.trigger_type AND NOT p.enabled)")
    assert outcomes["delivered"] == enabled
    assert outcomes["skipped_preference"] == recipients - enabled > 0
    # Per trigger too: its recipient_count is the number of its outcomes.
    assert scalar(
        pg, "SELECT count(*) FROM notification_triggers t WHERE t.recipient_count <>"
            " (SELECT count(*) FROM trigger_recipient_outcomes o WHERE o.trigger_id = t.id)") == 0
    # Preferences were honoured: nobody got a type they disabled.
    assert scalar(
        pg, "SELECT count(*) FROM notifications n JOIN user_notification_preferences p"
            " ON p.user_id = n.user_id AND p.notification_type = n.notification_type AND NOT p.enabled") == 0

    # The run is recorded, under the Airflow run id, with its counts.
    (run_id, run_type, state), = airflow_runs(airflow_home)
    assert (run_type, state) == ("manual", "success")
    run = pg.execute(
        "SELECT run_id, mode, dry_run, triggers, counts, finished_at FROM herald_runs").fetchall()
    assert len(run) == 1
    rec_id, mode, dry_run, triggers, counts, finished_at = run[0]
    assert (rec_id, mode, dry_run, triggers) == (run_id, "manual", False, 300)
    assert finished_at is not None
    assert counts["delivered"] == notifications
    assert counts["triggers_done"] == 300 and counts["triggers_failed"] == 0
    assert counts["recipients"] == recipients
    assert counts["skipped_preference"] == outcomes["skipped_preference"]
    assert counts["rate_limited"] == outcomes.get("rate_limited", 0) + outcomes.get("digested", 0)

    # A second run finds nothing to do and delivers nothing new.
    second = dags_test()
    assert second.returncode == 0
    assert scalar(pg, "SELECT count(*) FROM notifications WHERE trigger_id IS NOT NULL") == notifications
    assert scalar(pg, "SELECT count(*) FROM trigger_recipient_outcomes") == recipients
    runs = airflow_runs(airflow_home)
    assert [r[2] for r in runs] == ["success", "success"]
    second_counts = scalar(pg, "SELECT counts FROM herald_runs WHERE run_id = %s", (runs[1][0],))
    assert second_counts["triggers"] == 0 and second_counts["delivered"] == 0


def test_dags_test_dry_run_writes_nothing(pg, dags_test, airflow_home):
    f.add_users(pg, range(1, 11))
    f.add_favorites(pg, range(1, 11), "item", 7)
    f.disable(pg, 3, "price_drop")
    fanout = f.add_trigger(pg, "price_drop", entity=("item", 7))
    urgent = f.add_trigger(pg, "security_alert", user_id=4, priority="urgent")
    bad = f.add_trigger(pg, "no_such_type", user_id=5)

    done = dags_test({"dry_run": True})
    assert done.returncode == 0

    assert scalar(pg, "SELECT count(*) FROM notifications") == 0
    assert scalar(pg, "SELECT count(*) FROM notification_outcomes") == 0
    for trigger_id in (fanout, urgent, bad):
        row = f.trigger(pg, trigger_id)
        assert row["status"] == "pending", row
        assert row["claimed_by"] is None and row["claim_expires_at"] is None, row
        assert row["processed_at"] is None and row["last_error"] is None, row
        assert row["attempts"] == 0, row
    # The run computed what it would have done, and says it was a dry run.
    run_id = airflow_runs(airflow_home)[-1][0]
    dry_run, counts = pg.execute(
        "SELECT dry_run, counts FROM herald_runs WHERE run_id = %s", (run_id,)).fetchone()
    assert dry_run is True
    assert counts["triggers"] == 3
    assert counts["delivered"] == 10  # 9 favoriters (one disabled the type) + the security alert
    assert counts["skipped_preference"] == 1
    assert counts["triggers_failed"] == 1


def test_a_conf_key_the_dag_does_not_declare_fails_the_run_at_once(pg, dags_test, airflow_home):
    """``{"dryrun": true}`` (a typo of dry_run) must not deliver for real: the run fails, naming the key."""
    f.add_users(pg, [1])
    t = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "x"})
    done = dags_test({"dryrun": True}, check=False)
    assert done.returncode != 0
    assert "unknown key(s) in the run's conf: 'dryrun'" in done.stdout + done.stderr
    assert airflow_runs(airflow_home)[-1][2] == "failed"
    row = f.trigger(pg, t)
    assert (row["status"], row["claimed_by"], row["attempts"]) == ("pending", None, 0)
    assert scalar(pg, "SELECT count(*) FROM notifications") == 0
