"""``herald up`` (default mode: ``airflow standalone``) with real processes: PostgreSQL metadata, sized
parallelism, and nothing left running when the command itself is SIGKILLed."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import time
import uuid

import httpx
import pytest
import redis

from herald import services
from herald.config import DAG_ID
from herald.processes import free_port
from herald.services.topology import Sizing, cpu_count, pool_slots
from tests.e2e.airflow_procs import ARTIFACTS
from tests.e2e.celery_up import answers, listening_ports, start_herald_up, still_running

pytestmark = pytest.mark.slow


def test_local_mode_metadata_in_postgres_sane_parallelism_and_nothing_outlives_a_sigkill(
    found_services: services.Services, db_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    metadata_db = f"herald_test_up_{os.getpid()}"
    metadata_url = services.create_database(found_services.database_url, metadata_db, drop_first=True)
    home = tmp_path_factory.mktemp("airflow_home_up")
    tag = uuid.uuid4().hex[:10]
    log_dir = ARTIFACTS / "up-local"
    shutil.rmtree(log_dir, ignore_errors=True)
    try:
        with start_herald_up(executor="local", home=home, db_url=db_url, redis_url=redis_url,
                             metadata_db=metadata_db, metadata_url=metadata_url, api_port=free_port(),
                             key_prefix=f"herald-e2e-{tag}:celery:", namespace=f"herald-e2e-{tag}:v1",
                             log_dir=log_dir) as up:
            # Airflow's metadata is in PostgreSQL, in the database herald made next to the notifications one.
            assert up.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == services.sqlalchemy_url(metadata_url)
            assert up.env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
            up.wait_for_dag(DAG_ID)

            # A backfill is created through the API (stored in PostgreSQL: no SQLite lock to answer 503 on).
            day = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).replace(hour=10, minute=0, second=0, microsecond=0)
            response = httpx.post(f"{up.api_url}/api/v2/backfills", headers={"Authorization": f"Bearer {up.token()}"},
                                  json={"dag_id": DAG_ID, "from_date": day.isoformat(), "to_date": day.isoformat(),
                                        "reprocess_behavior": "none", "max_active_runs": 1}, timeout=60)
            assert response.status_code == 200, response.text
            assert up.query("SELECT dag_id FROM backfill WHERE id = %(i)s", {"i": response.json()["id"]}) == [
                {"dag_id": DAG_ID}]

            # Parallelism from the pools (8 + 4 + 2), not Airflow's 32: that many LocalExecutor workers.
            sizing = Sizing.from_pools(pool_slots(), cpu_count())
            assert up.env["AIRFLOW__CORE__PARALLELISM"] == str(sizing.parallelism) == "19"

            def local_workers() -> list:
                found = []
                for p in up.tree():
                    try:
                        if " ".join(p.cmdline()).startswith("airflow worker -- LocalExecutor"):
                            found.append(p)
                    except Exception:
                        continue
                return found if len(found) >= sizing.parallelism else []

            assert len(up.wait_for(local_workers, 120, "the LocalExecutor workers")) == sizing.parallelism

            tree = up.tree()
            snapshot = [(p.pid, p.create_time(), p.name()) for p in tree]
            ports = listening_ports(tree)
            assert ("127.0.0.1", up.api_port) in ports
            assert len(snapshot) >= 20  # herald up, supervisor, standalone, its 4 parts, 19 workers, log servers
            killed = time.monotonic()
            os.kill(up.process.pid, signal.SIGKILL)  # herald up itself, without a chance to clean up
            up.process.wait(10)
            deadline = time.monotonic() + 120
            while still_running(snapshot) and time.monotonic() < deadline:
                time.sleep(0.5)
            took = time.monotonic() - killed
            assert still_running(snapshot) == [], (still_running(snapshot), up.logs())
            assert not [port for _, port in ports if answers(port)]
            print(f"\nSIGKILL of herald up: {len(snapshot)} processes and {len(ports)} ports gone in {took:.1f}s")
    finally:
        services.drop_database(found_services.database_url, metadata_db)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"herald-e2e-{tag}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
