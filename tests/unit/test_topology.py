"""What each mode of ``herald up`` starts and the environment its processes share (pure functions)."""

from __future__ import annotations

import shlex
import signal
import stat
from pathlib import Path

import pytest

from herald import observability
from herald.services import Services
from herald.services.topology import Sizing, build, pool_slots, shared_environment, shared_secrets

FOUND = Services("postgresql://postgres@127.0.0.1:5432/herald", "redis://127.0.0.1:6379/0", "local", "local")
POOLS = {"notifications": 8, "urgent_notifications": 4,
         "email_deliveries": 2, "webhook_deliveries": 2, "apprise_deliveries": 1}


def test_sizing_comes_from_the_pools_and_the_cores() -> None:
    assert pool_slots() == POOLS  # what airflow_settings.yaml declares
    two = Sizing.from_pools(POOLS, cores=2)
    # every pool slot can run (urgent never waits on parallelism); 2 normal batches per core on the default
    # worker, plus a process per channel slot (they wait on SMTP and HTTP) and the support tasks
    assert (two.parallelism, two.urgent_concurrency, two.default_concurrency) == (19, 4, 11)
    eight = Sizing.from_pools(POOLS, cores=8)
    assert (eight.parallelism, eight.urgent_concurrency, eight.default_concurrency) == (19, 4, 15)
    assert Sizing.from_pools({"notifications": 40, "urgent_notifications": 10}, cores=4).parallelism == 52


def test_celery_mode_starts_six_processes_on_127_0_0_1(tmp_path: Path) -> None:
    topo = build("celery", found=FOUND, metadata_url="postgresql://postgres@127.0.0.1:5432/herald_airflow",
                 airflow_home=tmp_path, api_port=18080, base={"PATH": "/usr/bin"}, pools=POOLS, cores=2)
    argv = {c.name: c.argv[1:] for c in topo.components}
    assert list(argv) == ["api-server", "scheduler", "dag-processor", "triggerer", "worker-urgent", "worker-default"]
    assert argv["api-server"] == ["api-server", "--host", "127.0.0.1", "--port", "18080"]
    assert argv["worker-urgent"] == ["celery", "worker", "--queues", "urgent", "--concurrency", "4",
                                     "-H", "urgent@%h", "--skip-serve-logs"]
    assert argv["worker-default"] == ["celery", "worker", "--queues", "default", "--concurrency", "11",
                                      "-H", "default@%h", "--skip-serve-logs"]
    assert "--skip-serve-logs" in argv["triggerer"] and "--skip-serve-logs" in argv["scheduler"]
    assert all(c.restart and c.log and c.env is topo.env for c in topo.components)
    assert topo.stop_order[0] == "scheduler" and topo.stop_order[-1] == "api-server"
    env = topo.env
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/0"
    assert env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX"] == "herald:celery:"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg://postgres@127.0.0.1:5432/herald_airflow"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__CORE__PARALLELISM"] == "19"
    assert env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "30"
    assert env["AIRFLOW_CONN_NOTIFICATIONS_DB"] == "postgres://postgres@127.0.0.1:5432/herald"
    assert "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT" not in env  # no log server in this mode
    secrets = shared_secrets(tmp_path)
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == secrets["jwt_secret"]
    assert env["AIRFLOW__CORE__FERNET_KEY"] == secrets["fernet_key"]


def test_local_mode_is_airflow_standalone_stopped_with_sigint(tmp_path: Path) -> None:
    topo = build("local", found=FOUND, metadata_url=None, airflow_home=tmp_path, api_port=8080, base={},
                 pools=POOLS, cores=2)
    (standalone,) = topo.components
    assert standalone.argv[1:] == ["standalone"]
    # standalone stops its parts on SIGINT to itself (SIGTERM would leave them running)
    assert standalone.stop_signal == signal.SIGINT and standalone.signal_group is False
    assert standalone.restart is False and standalone.log is None
    assert topo.env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in topo.env  # no metadata URL given: the operator's own
    assert int(topo.env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"]) != 8793  # a free port, not a clash


def test_the_operators_airflow_settings_win_except_what_makes_the_mode(tmp_path: Path) -> None:
    base = {"AIRFLOW__CORE__PARALLELISM": "5", "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "90",
            "AIRFLOW__CORE__EXECUTOR": "KubernetesExecutor", "AIRFLOW__API__HOST": "0.0.0.0",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg://elsewhere/af"}
    env = shared_environment("celery", found=FOUND, metadata_url="postgresql://x@h/y", airflow_home=tmp_path,
                             api_port=9999, sizing=Sizing(14, 4, 6), base=base)
    assert env["AIRFLOW__CORE__PARALLELISM"] == "5"
    assert env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "90"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg://elsewhere/af"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"


def test_celery_mode_needs_redis(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="needs Redis"):
        shared_environment("celery", found=Services(FOUND.database_url, None, "local", None), metadata_url=None,
                           airflow_home=tmp_path, api_port=1, sizing=Sizing(14, 4, 6), base={})


def test_sentry_and_statsd_are_switched_on_by_one_variable_each() -> None:
    assert observability.airflow_environment({}) == {}
    env = observability.airflow_environment({"SENTRY_DSN": "https://k@sentry.example/1",
                                             "HERALD_STATSD": "10.0.0.5:9125"})
    assert env == {
        "AIRFLOW__SENTRY__SENTRY_ON": "True",
        "AIRFLOW__SENTRY__SENTRY_DSN": "https://k@sentry.example/1",
        "AIRFLOW__SENTRY__INCLUDE_LOCAL_VARIABLES": "False",
        "AIRFLOW__SENTRY__MAX_BREADCRUMBS": "0",
        "AIRFLOW__SENTRY__SEND_DEFAULT_PII": "False",
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "10.0.0.5",
        "AIRFLOW__METRICS__STATSD_PORT": "9125",
    }
    assert observability.airflow_environment({"HERALD_STATSD": "statsd"})["AIRFLOW__METRICS__STATSD_PORT"] == "8125"


def test_secrets_are_made_once_and_kept_private(tmp_path: Path) -> None:
    first = shared_secrets(tmp_path)
    assert set(first) == {"jwt_secret", "api_secret_key", "fernet_key"} and all(first.values())
    assert shared_secrets(tmp_path) == first
    assert stat.S_IMODE((tmp_path / "herald-secrets.json").stat().st_mode) == 0o600


def test_env_file_reproduces_the_shared_environment(tmp_path: Path) -> None:
    topo = build("celery", found=FOUND, metadata_url="postgresql://postgres@127.0.0.1:5432/herald_airflow",
                 airflow_home=tmp_path, api_port=18080, base={"SENTRY_DSN": "http://k@h/1", "HOME": "/root"},
                 pools=POOLS, cores=2)
    path = topo.write_env_file(tmp_path / "herald.env")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    parsed = dict(shlex.split(line)[0].split("=", 1) for line in path.read_text().splitlines()
                  if line and not line.startswith("#"))
    assert parsed["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and parsed["SENTRY_DSN"] == "http://k@h/1"
    assert parsed["REDIS_URL"] == "redis://127.0.0.1:6379/0" and "HOME" not in parsed
    assert all(parsed[k] == topo.env[k] for k in parsed)
