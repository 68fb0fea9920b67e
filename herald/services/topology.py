"""What each mode of ``herald up`` starts, and the environment those processes share.

``local`` (the default, ``./scripts/up``)
    ``airflow standalone``: api-server, scheduler with the LocalExecutor, dag-processor and triggerer,
    as standalone starts them. The LocalExecutor ignores a task's queue.

``celery`` (``./scripts/up --executor celery``)
    Six processes: ``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer``, and two
    Celery workers: one consuming only the ``urgent`` queue, one consuming ``default``. Redis (the one
    herald found or started) is the broker, under the key prefix ``herald:celery:``; Celery's results
    go to the metadata database. Logs are served from the local files (``--skip-serve-logs``: no log
    server listens anywhere).

In both modes:

* Airflow's metadata lives in PostgreSQL, in its own database (``herald_airflow``) on the server that
  herald found or started (:func:`herald.services.discovery.metadata_database`);
* the API server listens on 127.0.0.1 only; the JWT secret, API secret key and Fernet key are made
  once and kept in ``<AIRFLOW_HOME>/herald-secrets.json`` (mode 0600), and every process gets them, with
  the execution API URL, from the one environment built here (also written to ``herald.env``);
* ``[core] parallelism`` is sized from the pools and the cores (:class:`Sizing`), not Airflow's 32;
* a lost task (its worker killed, its machine gone) is noticed after ``task_instance_heartbeat_timeout``
  (30 s, checked every 5 s) and retried after the task's ``retry_delay`` (10 s): under a minute, far
  inside the claim lease (``herald_claim_lease_seconds``, 900 s), so no other run takes its triggers
  over meanwhile. A task sent to a worker that died before starting it is re-queued after
  ``task_queued_timeout`` (120 s). Celery's visibility timeout (1,800 s) only has to exceed the longest
  task (``execution_timeout`` 5 min), since Airflow itself re-queues lost tasks;
* ``SENTRY_DSN`` and ``HERALD_STATSD`` switch on error tracking and metrics (:mod:`herald.observability`).

Operators' own ``AIRFLOW__*`` variables win over every default here, except what makes the mode what it
is (executor, DAG and plugin folders, the API server's address and port, the notifications connections).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from herald.config import CHANNEL_POOLS, POOL_NORMAL, POOL_URGENT, PROJECT_ROOT, QUEUE_URGENT
from herald.processes import free_port
from herald.services.discovery import Services
from herald.services.supervisor import Component, Plan
from herald.services.urls import environment, sqlalchemy_url

MODES = ("local", "celery")
DEFAULT_QUEUE = "default"
#: Celery keys live under this prefix in the broker's Redis (the notifications cache uses ``herald:v1``).
CELERY_KEY_PREFIX = "herald:celery:"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
ADMIN_USER = "admin"
#: Variables besides AIRFLOW* that go into herald.env.
ENV_FILE_KEYS = ("DATABASE_URL", "REDIS_URL", "SENTRY_DSN", "HERALD_STATSD")

#: Task slots beyond the two herald pools: claim, the two tiny batches_of tasks, finalize, watcher and
#: housekeeping run in default_pool, a couple at a time.
SUPPORT_SLOTS = 2
#: Normal batches one core keeps busy at once (they spend much of their time waiting on PostgreSQL).
NORMAL_BATCHES_PER_CORE = 2

#: Lost-task detection (see the module docstring).
HEARTBEAT_TIMEOUT_SECONDS = 30
HEARTBEAT_CHECK_SECONDS = 5
QUEUED_TIMEOUT_SECONDS = 120
VISIBILITY_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class Sizing:
    """How many task processes may run at once, from the pools (the real throttle) and the cores.

    ``parallelism`` lets every pool slot run (normal + urgent + channels + support), so the executor's limit never
    holds an urgent batch back: Airflow's default of 32 forks 32 LocalExecutor workers even on 2 cores.
    Under Celery each worker runs what its queue needs: the urgent worker one process per urgent slot,
    the default worker ``NORMAL_BATCHES_PER_CORE`` normal batches per core (at most the pool) plus the
    support tasks; normal batches beyond that wait in the broker, where urgent ones never do.
    """

    parallelism: int
    urgent_concurrency: int
    default_concurrency: int

    @classmethod
    def from_pools(cls, pools: Mapping[str, int], cores: int) -> Sizing:
        urgent = max(1, int(pools.get(POOL_URGENT, 1)))
        normal = max(1, int(pools.get(POOL_NORMAL, 1)))
        # The channel pools' send tasks (notification_delivery) run on the default queue; they wait on
        # SMTP and HTTP, not on a core, so each of their slots gets a process of its own.
        channels = sum(max(0, int(pools.get(pool, 0))) for pool in CHANNEL_POOLS.values())
        cores = max(1, cores)
        return cls(
            parallelism=normal + urgent + channels + SUPPORT_SLOTS,
            urgent_concurrency=urgent,
            default_concurrency=min(normal, NORMAL_BATCHES_PER_CORE * cores) + channels + SUPPORT_SLOTS,
        )


def pool_slots(settings_file: Path = PROJECT_ROOT / "airflow_settings.yaml") -> dict[str, int]:
    """Pool name -> slots, as ``airflow_settings.yaml`` declares them."""
    from herald.airflow_settings import load_settings_file

    return {p.name: p.slots for p in load_settings_file(settings_file).pools}


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


SECRETS_FILE = "herald-secrets.json"
_SECRET_KEYS = ("jwt_secret", "api_secret_key", "fernet_key")


def shared_secrets(airflow_home: Path) -> dict[str, str]:
    """The secrets every process shares, made once per Airflow home and kept in a 0600 file.

    ``jwt_secret`` signs the workers' Execution API tokens and the UI's sessions, ``api_secret_key`` the
    API server's own, ``fernet_key`` encrypts connection passwords and Variables in the metadata database.
    """
    path = airflow_home / SECRETS_FILE
    try:
        data = json.loads(path.read_text())
        if all(data.get(k) for k in _SECRET_KEYS):
            return data
    except (OSError, ValueError):
        data = {}
    from cryptography.fernet import Fernet

    data = {
        "jwt_secret": data.get("jwt_secret") or secrets.token_urlsafe(48),
        "api_secret_key": data.get("api_secret_key") or secrets.token_urlsafe(48),
        "fernet_key": data.get("fernet_key") or Fernet.generate_key().decode(),
    }
    airflow_home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    return data


@dataclass
class Topology:
    mode: str
    env: dict[str, str]
    components: list[Component]
    stop_order: list[str]
    api_url: str
    sizing: Sizing

    def write_env_file(self, path: Path) -> Path:
        """The shared environment as a shell file (mode 0600: it holds the secrets).

        ``set -a; . .herald/airflow/herald.env; set +a`` gives a shell the same Airflow as the running
        processes (``airflow dags trigger ...``); on another machine it is the starting point of the shared
        environment (see the README, "Several machines").
        """
        keys = sorted(k for k in self.env if k.startswith("AIRFLOW") or k in ENV_FILE_KEYS)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# herald up --executor {self.mode}: the environment every Airflow process shares\n")
            fh.writelines(f"{k}={shlex.quote(self.env[k])}\n" for k in keys)
        return path

    def plan(self, state_file: Path | None = None, embedded_root: Path | None = None) -> Plan:
        return Plan(components=self.components, stop_order=self.stop_order,
                    state_file=str(state_file) if state_file else None,
                    embedded_root=str(embedded_root) if embedded_root else None)


def shared_environment(
    mode: str,
    *,
    found: Services,
    metadata_url: str | None,
    airflow_home: Path,
    api_port: int,
    sizing: Sizing,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of every Airflow process of ``mode`` (see the module docstring)."""
    from herald import observability

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    base = dict(os.environ if base is None else base)
    env = dict(base)
    shared = shared_secrets(airflow_home)
    api_url = f"http://127.0.0.1:{api_port}"
    defaults = {
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__PARALLELISM": str(sizing.parallelism),
        "AIRFLOW__API_AUTH__JWT_SECRET": shared["jwt_secret"],
        "AIRFLOW__API__SECRET_KEY": shared["api_secret_key"],
        "AIRFLOW__CORE__FERNET_KEY": shared["fernet_key"],
        "AIRFLOW__API__BASE_URL": api_url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_SECONDS),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": str(HEARTBEAT_CHECK_SECONDS),
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(QUEUED_TIMEOUT_SECONDS),
        **observability.airflow_environment(base),
    }
    if mode == "local":
        # airflow standalone's scheduler and triggerer serve logs (Airflow binds them to every interface;
        # standalone has no --skip-serve-logs): free ports, so they never clash with another Airflow here.
        defaults["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
        defaults["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] = str(free_port())
    if metadata_url:
        defaults["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = sqlalchemy_url(metadata_url)
    if mode == "celery":
        if not found.redis_url:
            raise RuntimeError("celery mode needs Redis as its broker; none was found or started")
        defaults.update({
            "AIRFLOW__CELERY__BROKER_URL": found.redis_url,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX":
                base.get("HERALD_CELERY_KEY_PREFIX") or CELERY_KEY_PREFIX,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_SECONDS),
        })
    for key, value in defaults.items():
        env.setdefault(key, value)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor" if mode == "celery" else "LocalExecutor",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        **environment(found),
        # `airflow standalone` starts its parts as `airflow ...` commands: the venv must be on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def build(
    mode: str,
    *,
    found: Services,
    metadata_url: str | None,
    airflow_home: Path,
    api_port: int,
    base: Mapping[str, str] | None = None,
    pools: Mapping[str, int] | None = None,
    cores: int | None = None,
) -> Topology:
    """The processes of ``mode`` and their shared environment."""
    sizing = Sizing.from_pools(pool_slots() if pools is None else pools, cpu_count() if cores is None else cores)
    env = shared_environment(mode, found=found, metadata_url=metadata_url, airflow_home=airflow_home,
                             api_port=api_port, sizing=sizing, base=base)
    airflow = str(Path(sys.executable).parent / "airflow")
    api_url = f"http://127.0.0.1:{api_port}"
    if mode == "local":
        components = [Component(name="standalone", argv=[airflow, "standalone"], env=env,
                                # standalone stops its parts on SIGINT; a task still running then cannot
                                # report to the API server it just stopped, so its wait is cut short.
                                stop_signal=int(signal.SIGINT), grace=20, restart=False, signal_group=False)]
        return Topology(mode, env, components, ["standalone"], api_url, sizing)

    logs = airflow_home / "herald-up"

    def component(name: str, *args: str, grace: float = 30) -> Component:
        return Component(name=name, argv=[airflow, *args], env=env, log=str(logs / f"{name}.log"), grace=grace)

    components = [
        component("api-server", "api-server", "--host", "127.0.0.1", "--port", str(api_port), grace=15),
        component("scheduler", "scheduler", "--skip-serve-logs"),
        component("dag-processor", "dag-processor"),
        component("triggerer", "triggerer", "--skip-serve-logs"),
        component("worker-urgent", "celery", "worker", "--queues", QUEUE_URGENT,
                  "--concurrency", str(sizing.urgent_concurrency), "-H", f"{QUEUE_URGENT}@%h", "--skip-serve-logs"),
        component("worker-default", "celery", "worker", "--queues", DEFAULT_QUEUE,
                  "--concurrency", str(sizing.default_concurrency), "-H", f"{DEFAULT_QUEUE}@%h",
                  "--skip-serve-logs"),
    ]
    # The scheduler first (nothing new is queued), the api-server last (workers report to it until then).
    stop_order = ["scheduler", "triggerer", "dag-processor", "worker-default", "worker-urgent", "api-server"]
    return Topology(mode, env, components, stop_order, api_url, sizing)
