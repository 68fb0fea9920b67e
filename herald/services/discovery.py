"""Finding (or starting) the PostgreSQL and Redis that herald talks to, and the databases on them.

Order, for each service:

1. the environment: ``DATABASE_URL`` / ``REDIS_URL``;
2. the Airflow connections ``notifications_db`` / ``notifications_redis`` given as environment
   variables (``AIRFLOW_CONN_NOTIFICATIONS_DB`` / ``AIRFLOW_CONN_NOTIFICATIONS_REDIS``, URI or JSON);
3. a local server on the standard port when it answers (PostgreSQL as user ``postgres`` with trust
   authentication on 127.0.0.1:5432, Redis on 127.0.0.1:6379; ``HERALD_LOCAL_PG`` /
   ``HERALD_LOCAL_REDIS`` = ``host:port`` point elsewhere);
4. an embedded server started from a PyPI package (see :mod:`herald.services.embedded`).

Airflow's own metadata database lives on the same PostgreSQL server, in a database of its own
(:func:`metadata_database`, ``herald_airflow`` by default), in every mode of ``herald up``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from herald.services import embedded
from herald.services.urls import (
    PG_CONN_ENV,
    REDIS_CONN_ENV,
    airflow_conn_from_env,
    host_port,
    pg_url,
    postgres_url_from_conn,
    redact_url,
    redis_url_from_conn,
    with_database,
)
from herald.services.urls import redis_url as make_redis_url

log = logging.getLogger(__name__)

LOCAL_PG = ("127.0.0.1", 5432)
LOCAL_REDIS = ("127.0.0.1", 6379)

#: The database of Airflow's metadata, next to the notifications database on the same server.
METADATA_DATABASE = "herald_airflow"


@dataclass
class Services:
    """Where herald's PostgreSQL and Redis are, and how each was found.

    Sources: ``env``, ``airflow`` (an ``AIRFLOW_CONN_*`` variable), ``local`` or ``embedded``.
    ``database_pid`` / ``redis_pid`` are the server process ids of embedded servers (else None).
    """

    database_url: str
    redis_url: str | None
    database_source: str
    redis_source: str | None
    database_pid: int | None = None
    redis_pid: int | None = None


def _local_address(env: str, default: tuple[str, int]) -> tuple[str, int]:
    value = os.environ.get(env)
    return host_port(value, default) if value else default


def _local_postgres(database: str) -> str | None:
    host, port = _local_address("HERALD_LOCAL_PG", LOCAL_PG)
    if not embedded.answers(host, port):
        log.debug("no PostgreSQL answers on %s:%s", host, port)
        return None
    import psycopg

    base = pg_url({"host": host, "port": port, "user": "postgres", "dbname": "postgres"})
    try:
        return create_database(base, database)
    except psycopg.Error as exc:
        log.warning("PostgreSQL on %s:%s answers but is not usable as user postgres (%s)", host, port,
                    str(exc).strip())
        return None


def _local_redis() -> str | None:
    host, port = _local_address("HERALD_LOCAL_REDIS", LOCAL_REDIS)
    if not embedded.answers(host, port):
        log.debug("no Redis answers on %s:%s", host, port)
        return None
    import redis

    client = redis.Redis(host=host, port=port, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        log.warning("Redis on %s:%s answers but does not PING (%s)", host, port, exc)
        return None
    finally:
        client.close()
    return make_redis_url(host, port, 0)


@contextmanager
def ensure_services(*, need_redis: bool = True, database: str = "herald") -> Iterator[Services]:
    """Find or start PostgreSQL (and Redis unless ``need_redis`` is false) for the duration of the block.

    ``database`` is created if missing on a local or embedded PostgreSQL; URLs from the environment or
    the Airflow connections are used as they are. Embedded servers started here stop when the block
    exits (unless another block or process still uses them).
    """
    with contextlib.ExitStack() as stack:
        db_pid: int | None = None
        db_url = os.environ.get("DATABASE_URL") or None
        db_source = "env"
        if not db_url:
            conn = airflow_conn_from_env(PG_CONN_ENV)
            if conn:
                db_url, db_source = postgres_url_from_conn(conn), "airflow"
        if not db_url:
            db_url, db_source = _local_postgres(database), "local"
        if not db_url:
            pg = embedded.acquire(embedded.EmbeddedPostgres, embedded.embedded_dir())
            stack.callback(embedded.release, pg)
            db_url, db_source, db_pid = create_database(pg.url, database), "embedded", pg.pid
        log.info("PostgreSQL (%s): %s", db_source, redact_url(db_url))

        redis_url: str | None = None
        redis_source: str | None = None
        redis_pid: int | None = None
        if need_redis:
            redis_url, redis_source = os.environ.get("REDIS_URL") or None, "env"
            if not redis_url:
                conn = airflow_conn_from_env(REDIS_CONN_ENV)
                if conn:
                    redis_url, redis_source = redis_url_from_conn(conn), "airflow"
            if not redis_url:
                redis_url, redis_source = _local_redis(), "local"
            if not redis_url:
                valkey = embedded.acquire(embedded.EmbeddedValkey, embedded.embedded_dir())
                stack.callback(embedded.release, valkey)
                redis_url, redis_source, redis_pid = valkey.url, "embedded", valkey.pid
            log.info("Redis (%s): %s", redis_source, redact_url(redis_url))

        yield Services(db_url, redis_url, db_source, redis_source, db_pid, redis_pid)


def create_database(url: str, name: str, *, drop_first: bool = False) -> str:
    """Create database ``name`` on the server of ``url`` if missing; return a URL to it."""
    import psycopg
    from psycopg import sql

    admin = with_database(url, "postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        if drop_first:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                pass  # created concurrently by another process
    return with_database(url, name)


def drop_database(url: str, name: str) -> None:
    """Drop database ``name`` (closing its connections) on the server of ``url`` if it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(with_database(url, "postgres"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def metadata_database(found: Services, name: str | None = None) -> str:
    """The libpq URL of Airflow's metadata database on herald's PostgreSQL server, created if missing.

    ``name`` defaults to ``HERALD_AIRFLOW_DATABASE`` or ``herald_airflow``. Airflow keeps its metadata
    here in every mode: SQLite refuses some operations under concurrent access (backfill creation
    answers HTTP 503 while a scheduled run starts).
    """
    import psycopg

    name = name or os.environ.get("HERALD_AIRFLOW_DATABASE") or METADATA_DATABASE
    try:
        return create_database(found.database_url, name)
    except psycopg.Error as exc:
        raise RuntimeError(
            f"cannot create Airflow's metadata database {name!r} on {redact_url(found.database_url)} "
            f"({type(exc).__name__}: {str(exc).strip()}); create it yourself or set "
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN to a PostgreSQL database Airflow may use"
        ) from None
