"""The urgent lane under a real deployment: api-server, scheduler, dag-processor and triggerer.

An urgent INSERT wakes ``notification_urgent`` through the triggerer within seconds; with the triggerer
stopped, the next scheduled two-minute ``notification_batch`` run still delivers it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from herald import services, verify
from herald.config import DAG_ID, POOL_URGENT, URGENT_DAG_ID, Settings
from tests import factories as f
from tests.e2e.airflow_procs import Cluster, deployment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lane(found_services: services.Services, db_url: str, redis_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("airflow_home_urgent")
    with deployment(found_services, db_url, redis_url, home, name="urgent_lane", schedule=True, triggerer=True,
                    unpause=(URGENT_DAG_ID,)) as cluster:
        cluster.wait_for_dag(DAG_ID)
        yield cluster


def delivered_at(pg, trigger_id: int) -> str | None:
    row = pg.execute("SELECT claimed_by FROM notification_triggers WHERE id = %s AND status = 'done'",
                     (trigger_id,)).fetchone()
    return row[0] if row else None


def test_an_urgent_insert_is_delivered_by_the_urgent_lane_within_seconds(pg, lane):
    f.add_users(pg, range(1, 4))
    pg.execute("UPDATE herald_urgent_lane SET signalled_through = 0, signalled_at = '-infinity'")
    # The first wake-up pays for the watcher's registration; then each insert is timed.
    latencies = []
    for user_id in (1, 2, 3):
        trigger = f.add_trigger(pg, "security_alert", user_id=user_id, priority="urgent",
                                payload={"message": "new login"})
        inserted = time.monotonic()
        claimed_by = lane.wait_for(lambda t=trigger: delivered_at(pg, t), 90, "the urgent trigger to be delivered",
                                   interval=0.1)
        latencies.append(time.monotonic() - inserted)
        assert claimed_by.startswith("asset_triggered__"), claimed_by
        assert f.notifications_of(pg, trigger) == [user_id]
        time.sleep(3)  # let the watcher re-arm, as between real inserts
    urgent_runs = [r for r in lane.runs(URGENT_DAG_ID)]
    assert len(urgent_runs) >= 3 and {r["state"] for r in urgent_runs} <= {"success", "running", "queued"}
    assert max(latencies[1:]) < 10, latencies  # the bench measures it properly (herald bench --latency)
    tis = lane.task_instances(urgent_runs[-1]["run_id"], URGENT_DAG_ID)
    assert [(t["task_id"], t["pool"], t["queue"]) for t in tis] == [("deliver_urgent", POOL_URGENT, "urgent")]
    report = verify.verify(pg, Settings(cache_namespace=lane.env["AIRFLOW_VAR_HERALD_CACHE_NAMESPACE"]))
    assert report.ok, report.describe()


def test_with_the_triggerer_stopped_the_two_minute_run_still_delivers_it(pg, lane):
    f.add_users(pg, [7])
    lane.stop("triggerer")
    lane.airflow("dags", "unpause", DAG_ID)
    trigger = f.add_trigger(pg, "security_alert", user_id=7, priority="urgent", payload={"message": "m"})
    claimed_by = lane.wait_for(lambda: delivered_at(pg, trigger), 200,
                               "the next scheduled notification_batch run to deliver the urgent trigger",
                               interval=1)
    assert claimed_by.startswith("scheduled__"), claimed_by
    assert f.notifications_of(pg, trigger) == [7]
    report = verify.verify(pg, Settings(cache_namespace=lane.env["AIRFLOW_VAR_HERALD_CACHE_NAMESPACE"]))
    assert report.ok, report.describe()
