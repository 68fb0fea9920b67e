"""A real ``airflow api-server`` with the herald plugin, shared by the end-to-end tests.

The server runs in a process group of its own, with a temporary ``AIRFLOW_HOME`` (SQLite metadata
database, migrated first), the simple auth manager with one admin whose password the test writes, and
the ``notifications_db`` / ``notifications_redis`` connections pointing at the test session's database
and Redis (as ``AIRFLOW_CONN_*`` variables). It is stopped by process group id at the end, whatever
happened. Its log is kept under ``artifacts/e2e/``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from psycopg.types.json import Jsonb

from herald.config import PROJECT_ROOT, Settings
from herald.processes import free_port, stop_process_group
from tests.e2e.airflow_procs import AIRFLOW, ARTIFACTS, notification_connections
from tests.e2e.browser import DevTools, chromium

STARTUP_TIMEOUT_SECONDS = 180
ADMIN = "admin"


@dataclass
class AirflowServer:
    base_url: str
    password: str
    namespace: str
    home: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def settings(self) -> Settings:
        return Settings(cache_namespace=self.namespace)

    def token(self, username: str = ADMIN, password: str | None = None) -> str:
        response = httpx.post(
            f"{self.base_url}/auth/token",
            json={"username": username, "password": self.password if password is None else password},
            timeout=30,
        )
        assert response.status_code == 201, (response.status_code, response.text)
        return response.json()["access_token"]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _airflow_env(home: Path, db_url: str, redis_url: str, namespace: str) -> dict[str, str]:
    # Nothing of the developer's own Airflow configuration leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(64),
            **notification_connections(db_url, redis_url),
            "AIRFLOW_VAR_HERALD_CACHE_NAMESPACE": namespace,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture(scope="session")
def airflow_server(
    db_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowServer]:
    home = tmp_path_factory.mktemp("airflow_home")
    namespace = f"herald-e2e-{uuid.uuid4().hex[:12]}:v1"
    env = _airflow_env(home, db_url, redis_url, namespace)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "api-server.log"

    migrate = subprocess.run(
        [str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert migrate.returncode == 0, (
        f"airflow db migrate failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}"
    )

    password = secrets.token_urlsafe(16)
    (home / "simple_auth_manager_passwords.json.generated").write_text(f'{{"{ADMIN}": "{password}"}}')

    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(AIRFLOW), "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole below
        )
    server = AirflowServer(f"http://127.0.0.1:{port}", password, namespace, home, log_path, process)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"airflow api-server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.base_url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"airflow api-server not healthy after {STARTUP_TIMEOUT_SECONDS}s:\n{server.log_tail()}"
                )
            time.sleep(0.5)
        yield server
    finally:
        stop_process_group(process, grace=20)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[DevTools]:
    """A headless Chromium page for this test (stopped by process group id afterwards)."""
    with chromium() as devtools:
        yield devtools


@pytest.fixture
def herald_redis(airflow_server: AirflowServer, redis_client) -> Iterator:
    """The shared Redis, with the server's namespace emptied after the test (never the whole database)."""
    yield redis_client
    keys = list(redis_client.scan_iter(match=f"{airflow_server.namespace}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


# ------------------------------------------------------------------------------------------ seed data


def _hourly_runs() -> list[tuple[str, int, int, dict]]:
    """One finished run per hour, 2 to 23 hours ago: a day of history for the chart."""
    runs = []
    for h in range(2, 24):
        done = 20 + (h * 7) % 30
        counts = {
            "delivered": done * 14,
            "skipped_preference": done // 5,
            "rate_limited": 0,
            "digested": 0,
            "failed": 0,
            "triggers_done": done,
            "triggers_failed": int(h % 3 == 0),
            "backlog": 30 + (h * 11) % 40,
        }
        runs.append((f"scheduled__h{h:02d}", h * 60, h * 60 - 1, counts))
    return runs


RUNS = [
    # run id, started and finished (minutes ago), counts
    (
        "scheduled__1",
        40,
        39,
        {
            "delivered": 1000,
            "skipped_preference": 50,
            "rate_limited": 5,
            "digested": 3,
            "failed": 2,
            "triggers_done": 70,
            "triggers_failed": 2,
        },
    ),
    (
        "scheduled__2",
        10,
        9,
        {
            "delivered": 234,
            "skipped_preference": 6,
            "rate_limited": 2,
            "digested": 0,
            "failed": 0,
            "triggers_done": 18,
            "triggers_failed": 0,
        },
    ),
    *_hourly_runs(),
]
_DAY = [c for _, _, finished, c in RUNS if finished < 24 * 60]

#: What ``seeded`` writes, and so what the plugin must report.
SEED = {
    "backlog": {"normal": 37, "urgent": 5, "total": 42},
    "claims": {"held": 3, "expired": 2},
    "outcomes_last_hour": {
        "delivered": 1234,
        "skipped_preference": 56,
        "rate_limited": 7,
        "digested": 3,
        "failed": 2,
    },
    "last_hour": {"triggers_processed": 90, "notifications_delivered": 1234},
    "last_24h": {
        "triggers_processed": sum(c["triggers_done"] + c["triggers_failed"] for c in _DAY),
        "notifications_delivered": sum(c["delivered"] for c in _DAY),
    },
    "recent_runs": ["scheduled__2", "scheduled__1", *(f"scheduled__h{h:02d}" for h in range(2, 10))],
    "cache": {"available": True, "hits": 900, "misses": 100, "hit_ratio": 0.9},
    "failed_reasons": [
        "payload misses 'new_price' for template price_drop",
        "unknown trigger type 'flash_sale'",
        "user 4242 does not exist",
    ],
}


@pytest.fixture
def seeded(pg, herald_redis, airflow_server: AirflowServer) -> dict:
    """Known rows in the test database and counters in the server's Redis namespace."""
    # 37 normal and 5 urgent pending triggers; of those, 3 claimed (held) and 2 with an expired claim
    pg.execute(
        """
        INSERT INTO notification_triggers (trigger_type, entity_type, entity_id, priority, status, created_at,
                                           claimed_by, claimed_at, claim_expires_at)
        SELECT 'price_drop', 'item', g, CASE WHEN g <= 5 THEN 'urgent' ELSE 'normal' END, 'pending',
               now() - make_interval(secs => 60 + g),
               CASE WHEN g BETWEEN 10 AND 14 THEN 'run-live' END,
               CASE WHEN g BETWEEN 10 AND 14 THEN now() END,
               CASE WHEN g BETWEEN 10 AND 12 THEN now() + interval '10 minutes'
                    WHEN g BETWEEN 13 AND 14 THEN now() - interval '1 minute' END
        FROM generate_series(1, 42) AS g
        """
    )
    # done triggers (not in the backlog) and three failed ones with their reasons, newest last
    pg.execute(
        """
        INSERT INTO notification_triggers (trigger_type, status, created_at, processed_at, payload)
        SELECT 'back_in_stock', 'done', now() - interval '2 hours', now() - interval '1 hour', '{}'
        FROM generate_series(1, 10)
        """
    )
    for minutes, reason in zip((30, 20, 10), reversed(SEED["failed_reasons"]), strict=True):
        pg.execute(
            """
            INSERT INTO notification_triggers
                (trigger_type, status, created_at, processed_at, last_error, payload)
            VALUES ('price_drop', 'failed', now() - make_interval(mins => %(m)s), now(), %(reason)s,
                    '{"note": "private payload"}')
            """,
            {"m": minutes, "reason": reason},
        )
    for run_id, started, finished, counts in RUNS:
        pg.execute(
            """
            INSERT INTO herald_runs (run_id, started_at, finished_at, triggers, counts, duration_seconds)
            VALUES (%(run_id)s, now() - make_interval(mins => %(s)s), now() - make_interval(mins => %(f)s),
                    %(triggers)s, %(counts)s, (%(s)s - %(f)s) * 60)
            """,
            {
                "run_id": run_id,
                "s": started,
                "f": finished,
                "triggers": counts["triggers_done"],
                "counts": Jsonb(counts),
            },
        )
    herald_redis.set(f"{airflow_server.namespace}:stats:cache_hits", 900)
    herald_redis.set(f"{airflow_server.namespace}:stats:cache_misses", 100)
    return SEED
