"""PostgreSQL access: named SQL files, connections, and the migration runner.

SQL lives in ``include/sql/`` one statement per file, named for what it does, always parameterised
with ``%(name)s`` placeholders. Nothing here builds SQL from strings.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from herald.config import SQL_DIR

log = logging.getLogger(__name__)

MIGRATIONS_DIR = SQL_DIR / "migrations"
#: pg_advisory_lock key held while migrating, so two ``herald db migrate`` at once run one after the other.
MIGRATION_LOCK_KEY = 0x68657261  # "hera"


@functools.cache
def sql(name: str) -> str:
    """The text of ``include/sql/<name>.sql``."""
    path = SQL_DIR / f"{name}.sql"
    try:
        return path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no SQL file {path}") from None


def connect(url: str, **kwargs: Any) -> psycopg.Connection:
    """A psycopg connection to ``url`` (``postgresql://...``)."""
    return psycopg.connect(url, **kwargs)


@contextmanager
def connection(url: str, **kwargs: Any) -> Iterator[psycopg.Connection]:
    conn = connect(url, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def run(
    conn: psycopg.Connection, name: str, params: Mapping[str, Any] | None = None, *, prepare: bool | None = False
) -> psycopg.Cursor:
    """Execute the named SQL file and return its cursor.

    By default never as a server-side prepared statement: psycopg prepares a query after its fifth
    run, and PostgreSQL may then switch to a generic plan, which for the pipeline's array-parameter
    queries can be far worse than the custom plan (seen: the rate-limit window count going from
    milliseconds to seconds). ``prepare=None`` restores psycopg's default, right for small
    single-row queries run many times (the reference processor).
    """
    return conn.execute(sql(name), params or {}, prepare=prepare)


def int_array(values: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers (``{1,2,3}``), for a ``%(x)s::bigint[]`` parameter.

    Tens of thousands of ids per batch: joining them here costs a fraction of psycopg's generic list
    dumper (measured: about 3 s of 27 s of a 10 x W1 run went to dumping lists).
    """
    return "{" + ",".join(map(str, values)) + "}"


# --------------------------------------------------------------------------------------- migrations


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def available_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    return [Migration(p.stem, p) for p in sorted(directory.glob("*.sql"))]


def migrate(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not yet applied, in order; return the versions applied.

    Holds a session advisory lock for the whole run, so concurrent callers wait and then find nothing
    to do. Refuses to run when an applied file changed since (its checksum differs).
    """
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS herald_schema_migrations (
                version    text PRIMARY KEY,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = dict(conn.execute("SELECT version, checksum FROM herald_schema_migrations").fetchall())
        migrations = available_migrations(directory)
        known = {m.version for m in migrations}
        for version in sorted(set(applied) - known):
            log.warning("migration %s is recorded as applied but its file is missing", version)
        changed = [m for m in migrations if m.version in applied and applied[m.version] != m.checksum]
        if changed:
            names = ", ".join(m.path.name for m in changed)
            raise MigrationError(
                f"applied migration file(s) changed since they were applied: {names}; "
                "add a new migration instead of editing an applied one (nothing was run)"
            )
        done: list[str] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            with conn.transaction():
                conn.execute(migration.text)
                conn.execute(
                    "INSERT INTO herald_schema_migrations (version, checksum) VALUES (%s, %s)",
                    (migration.version, migration.checksum),
                )
            log.info("applied migration %s", migration.version)
            done.append(migration.version)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
