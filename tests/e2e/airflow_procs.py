"""Start, drive and stop real Airflow processes for the tests (no mocks, only 127.0.0.1).

* :func:`airflow_env` builds the environment of every Airflow command a test runs: a temporary
  ``AIRFLOW_HOME``, the project's ``dags/`` and ``plugins/``, the ``notifications_db`` /
  ``notifications_redis`` connections as ``AIRFLOW_CONN_*`` variables, the herald Variables as
  ``AIRFLOW_VAR_HERALD_*``, and nothing of the developer's own ``AIRFLOW*`` environment.
* :func:`airflow` runs one CLI command and fails the test with its output when it fails.
* :class:`Cluster` is a scheduler deployment: ``airflow api-server`` (Execution API included),
  ``airflow scheduler`` (LocalExecutor), ``airflow dag-processor`` and optionally ``airflow
  triggerer``, each in a process group of its own, on a PostgreSQL metadata database;
  :meth:`Cluster.stop` ends each group by its id. :func:`deployment` makes one for a test module.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from psycopg.rows import dict_row

from herald import services
from herald.config import DAG_ID, POOL_NORMAL, POOL_URGENT, PROJECT_ROOT
from herald.processes import free_port, stop_process_group

AIRFLOW = Path(sys.executable).with_name("airflow")
ARTIFACTS = PROJECT_ROOT / "artifacts" / "e2e"


def notification_connections(db_url: str, redis_url: str) -> dict[str, str]:
    """``AIRFLOW_CONN_NOTIFICATIONS_DB`` / ``_REDIS`` for these URLs: the conversion ``herald up`` uses."""
    env = services.environment(services.Services(db_url, redis_url, "env", "env"))
    return {k: v for k, v in env.items() if k.startswith("AIRFLOW_CONN_")}


def sqlalchemy_postgres_uri(libpq_url: str) -> str:
    """A libpq URL or DSN as the metadata DB's SQLAlchemy URL (psycopg 3 driver)."""
    return services.sqlalchemy_url(libpq_url)


def airflow_env(
    home: Path,
    *,
    db_url: str,
    redis_url: str,
    namespace: str,
    metadata_url: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of an Airflow process for herald (see the module doc).

    ``metadata_url`` (a libpq URL) puts the metadata DB in PostgreSQL; without it, SQLite in ``home``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "HERALD_FAULT_ONCE"}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                sqlalchemy_postgres_uri(metadata_url) if metadata_url else f"sqlite:///{home / 'airflow.db'}"
            ),
            **notification_connections(db_url, redis_url),
            "AIRFLOW_VAR_HERALD_CACHE_NAMESPACE": namespace,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def airflow(*args: str, env: Mapping[str, str], timeout: float = 300, check: bool = True,
            ) -> subprocess.CompletedProcess:
    """Run ``airflow *args``; with ``check``, a non-zero exit fails with the command's output."""
    started = time.monotonic()
    done = subprocess.run([str(AIRFLOW), *args], env=dict(env), capture_output=True, text=True,
                          timeout=timeout)
    done.seconds = round(time.monotonic() - started, 1)  # type: ignore[attr-defined]
    if check and done.returncode != 0:
        raise AssertionError(
            f"airflow {' '.join(args)} exited {done.returncode}:\n"
            f"--- stdout (tail) ---\n{done.stdout[-6000:]}\n--- stderr (tail) ---\n{done.stderr[-6000:]}"
        )
    return done


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


@dataclass
class Cluster:
    """api-server + scheduler + dag-processor on one PostgreSQL metadata DB (see the module doc)."""

    home: Path
    env: dict[str, str]
    metadata_url: str
    api_port: int
    log_dir: Path
    scheduler_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # ------------------------------------------------------------------------------ processes

    def _start(self, name: str, args: list[str], env: Mapping[str, str]) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [str(AIRFLOW), *args], env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, stopped as a whole by stop()
            )
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def start(self, startup_timeout: float = 120, *, triggerer: bool = False) -> None:
        self._start("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port),
                                   "--workers", "1"], self.env)
        self._start("dag-processor", ["dag-processor"], self.env)
        self._start("scheduler", ["scheduler"], {**self.env, **self.scheduler_env})
        if triggerer:  # runs the urgent lane's watcher (herald.urgent)
            self._start("triggerer", ["triggerer"], self.env)
        self.wait_for(self._api_healthy, startup_timeout, "the api-server to answer /api/v2/monitor/health")

    def _api_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, name: str | None = None) -> None:
        """Stop every process (or only ``name``), each by its process group."""
        for proc in reversed(self.procs):
            if name is None or proc.name == name:
                stop_process_group(proc.process, grace=20)
        self.procs = [p for p in self.procs if name is not None and p.name != name]

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is not None:
                raise AssertionError(
                    f"airflow {proc.name} exited with {proc.process.returncode}\n{self.logs()}")

    def logs(self, lines: int = 80) -> str:
        return "\n".join(f"===== {p.name} ({p.log_path}) =====\n{p.tail(lines)}" for p in self.procs)

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
        """Poll ``condition`` until it returns something truthy; fail with every process's log."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(interval)

    # ------------------------------------------------------------------------------ commands

    def airflow(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return airflow(*args, env=self.env, timeout=timeout)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows of a query on the Airflow metadata DB."""
        with psycopg.connect(self.metadata_url, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    def wait_for_dag(self, dag_id: str = DAG_ID, timeout: float = 120) -> None:
        """Until the dag-processor has serialized ``dag_id`` into the metadata DB."""
        self.wait_for(
            lambda: self.query(
                "SELECT 1 FROM serialized_dag s JOIN dag d USING (dag_id)"
                " WHERE s.dag_id = %(d)s AND NOT d.is_stale", {"d": dag_id}),
            timeout, f"the dag-processor to serialize {dag_id}",
        )

    def trigger(self, run_id: str, dag_id: str = DAG_ID, conf: dict | None = None) -> None:
        args = ["dags", "trigger", dag_id, "--run-id", run_id]
        if conf is not None:
            args += ["--conf", json.dumps(conf)]
        self.airflow(*args)

    def runs(self, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        return self.query(
            "SELECT run_id, run_type, state, logical_date, data_interval_start, data_interval_end,"
            " backfill_id FROM dag_run WHERE dag_id = %(d)s ORDER BY logical_date NULLS LAST, run_id",
            {"d": dag_id})

    def wait_for_runs(self, run_ids: list[str], timeout: float, dag_id: str = DAG_ID) -> dict[str, str]:
        """Until every run in ``run_ids`` is finished (success or failed); returns run id -> state."""
        def finished() -> dict[str, str] | None:
            states = {r["run_id"]: r["state"] for r in self.runs(dag_id) if r["run_id"] in run_ids}
            if len(states) == len(run_ids) and all(s in ("success", "failed") for s in states.values()):
                return states
            return None

        return self.wait_for(finished, timeout, f"runs {run_ids} of {dag_id} to finish")

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        return self.query(
            "SELECT task_id, map_index, rendered_map_index, state, pool, queue, try_number, priority_weight"
            " FROM task_instance WHERE dag_id = %(d)s AND run_id = %(r)s ORDER BY task_id, map_index",
            {"d": dag_id, "r": run_id})

    def task_failures(self, run_id: str, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        """Earlier tries of the run's task instances (Airflow keeps them in task_instance_history)."""
        return self.query(
            "SELECT task_id, map_index, state, try_number, pool FROM task_instance_history"
            " WHERE dag_id = %(d)s AND run_id = %(r)s ORDER BY task_id, map_index, try_number",
            {"d": dag_id, "r": run_id})


def cluster_config(api_port: int) -> dict[str, str]:
    """What a scheduler deployment of herald needs beyond :func:`airflow_env` (tuned for fast tests).

    Every process (api-server, scheduler and its LocalExecutor workers, dag-processor) must share the
    same JWT secret (the scheduler signs the workers' Execution API tokens, the api-server checks them)
    and know where the Execution API is.
    """
    return {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        # The scheduler's and triggerer's log servers bind 0.0.0.0:8793 / 8794 by default: taken when two
        # deployments run at once.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        # Manual and backfill runs only: a scheduled run of the */2 DAG would race the test's own run.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__PARALLELISM": "16",
    }


@contextmanager
def deployment(
    found: services.Services,
    db_url: str,
    redis_url: str,
    home: Path,
    *,
    name: str,
    schedule: bool = False,
    triggerer: bool = False,
    scheduler_env: Mapping[str, str] | None = None,
    unpause: tuple[str, ...] = (DAG_ID,),
) -> Iterator[Cluster]:
    """A :class:`Cluster` on a PostgreSQL metadata DB of its own, with herald's pools, for a test module.

    ``schedule``: cron and asset-triggered runs on (``[scheduler] use_job_schedule``; assets need it).
    ``name`` names the metadata DB, the Redis namespace and the log folder under ``artifacts/e2e/``.
    Everything is stopped, dropped and deleted at the end, whatever happened.
    """
    database = f"herald_test_{name}_{os.getpid()}"
    metadata_url = services.create_database(found.database_url, database, drop_first=True)
    namespace = f"herald-{name}-{uuid.uuid4().hex[:12]}:v1"
    api_port = free_port()
    config = cluster_config(api_port) | {"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(schedule)}
    env = airflow_env(home, db_url=db_url, redis_url=redis_url, namespace=namespace,
                      metadata_url=metadata_url, extra=config)
    log_dir = ARTIFACTS / name
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    cluster = Cluster(home, env, metadata_url, api_port, log_dir, scheduler_env=dict(scheduler_env or {}))
    try:
        airflow("db", "migrate", env=env, timeout=300)
        airflow("pools", "set", POOL_NORMAL, "8", "herald normal notification batches", env=env)
        airflow("pools", "set", POOL_URGENT, "4", "herald urgent notification batches", env=env)
        cluster.start(triggerer=triggerer)
        for dag_id in unpause:
            cluster.wait_for_dag(dag_id)
            cluster.airflow("dags", "unpause", dag_id)
        yield cluster
    finally:
        cluster.stop()
        services.drop_database(found.database_url, database)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
