"""DAG integrity, Astronomer style: every DAG file in ``dags/`` parses and follows the project's rules.

Each test collects every violation and reports them together, so one run shows all that is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from herald import config

SETTINGS_FILE = config.PROJECT_ROOT / "airflow_settings.yaml"
DEFAULT_POOL = "default_pool"


@pytest.fixture(scope="module")
def dagbag(dag_folder: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag  # after conftest.py has set AIRFLOW_HOME

    return DagBag(dag_folder=str(dag_folder))


@pytest.fixture(scope="module")
def dags(dagbag: Any) -> dict[str, Any]:
    return dagbag.dags


@pytest.fixture(scope="module")
def airflow_settings() -> dict[str, Any]:
    return yaml.safe_load(SETTINGS_FILE.read_text())["airflow"]


def test_every_dag_file_imports_without_errors(dagbag: Any) -> None:
    errors = "\n\n".join(f"{path}:\n{error}" for path, error in dagbag.import_errors.items())
    assert not dagbag.import_errors, f"DAG import errors:\n{errors}"


def test_at_least_one_dag_is_found(dags: dict[str, Any], dag_folder: Path) -> None:
    assert dag_folder.is_dir(), f"no DAG folder at {dag_folder}"
    assert len(dags) >= 1, f"no DAG found in {dag_folder}"


def test_every_dag_has_tags_and_an_owner_other_than_airflow(dags: dict[str, Any]) -> None:
    problems = [f"{dag_id}: no tags" for dag_id, dag in dags.items() if not dag.tags]
    problems += [
        f"{dag_id}.{task.task_id}: owner {task.owner!r}"
        for dag_id, dag in dags.items()
        for task in dag.tasks
        if not task.owner or task.owner == "airflow"
    ]
    assert not problems, "\n".join(problems)


def test_every_task_retries_at_least_twice_with_an_execution_timeout(dags: dict[str, Any]) -> None:
    problems = []
    for dag_id, dag in dags.items():
        for task in dag.tasks:
            if (task.retries or 0) < 2:
                problems.append(f"{dag_id}.{task.task_id}: retries={task.retries}")
            if task.execution_timeout is None:
                problems.append(f"{dag_id}.{task.task_id}: no execution_timeout")
    assert not problems, "\n".join(problems)


def test_every_pool_a_task_uses_is_declared_in_airflow_settings(
    dags: dict[str, Any], airflow_settings: dict[str, Any]
) -> None:
    declared = {pool["pool_name"] for pool in airflow_settings.get("pools") or []}
    problems = [
        f"{dag_id}.{task.task_id}: pool {task.pool!r} is not among the pools of {SETTINGS_FILE.name}"
        for dag_id, dag in dags.items()
        for task in dag.tasks
        if task.pool != DEFAULT_POOL and task.pool not in declared
    ]
    assert not problems, "\n".join([*problems, f"declared: {sorted(declared)}"])


def test_notification_batch_runs_every_two_minutes_one_run_at_a_time(dags: dict[str, Any]) -> None:
    if config.DAG_ID not in dags:
        pytest.fail(f"DAG {config.DAG_ID!r} not found; the DAGs found are {sorted(dags)}")
    dag = dags[config.DAG_ID]
    schedule = dag.schedule if isinstance(dag.schedule, str) else getattr(dag.timetable, "expression", None)
    assert schedule == "*/2 * * * *"
    assert dag.catchup is False
    assert dag.max_active_runs == 1


def test_airflow_settings_mirror_the_names_and_defaults_of_herald_config(
    airflow_settings: dict[str, Any],
) -> None:
    connections = {c["conn_id"] for c in airflow_settings.get("connections") or []}
    pools = {p["pool_name"] for p in airflow_settings.get("pools") or []}
    variables = {v["variable_name"]: v["variable_value"] for v in airflow_settings.get("variables") or []}
    assert {config.POSTGRES_CONN_ID, config.REDIS_CONN_ID, config.SMTP_CONN_ID, config.WEBHOOK_CONN_ID} <= connections
    assert {config.POOL_NORMAL, config.POOL_URGENT, *config.CHANNEL_POOLS.values()} <= pools
    assert variables == {name: str(value) for name, value in config.defaults().items()}


def test_the_urgent_lane_is_one_task_in_the_urgent_pool_and_queue_woken_by_its_watcher(dags: dict[str, Any]) -> None:
    from herald.urgent import UrgentTriggersWaiting

    dag = dags[config.URGENT_DAG_ID]
    assert [t.task_id for t in dag.tasks] == ["deliver_urgent"]  # one task start per wake-up
    (task,) = dag.tasks
    assert (task.pool, task.queue, task.priority_weight) == (config.POOL_URGENT, config.QUEUE_URGENT, 100)
    assets = list(dag.timetable.asset_condition.objects)
    assert [a.name for a in assets] == [config.URGENT_ASSET]
    (watcher,) = assets[0].watchers
    assert isinstance(watcher.trigger, UrgentTriggersWaiting)
    assert dag.max_active_runs > 1  # a slow urgent run does not hold up the next one
    assert dag.catchup is False


def test_notification_delivery_runs_every_minute_with_a_pool_per_channel(dags: dict[str, Any]) -> None:
    if config.DELIVERY_DAG_ID not in dags:
        pytest.fail(f"DAG {config.DELIVERY_DAG_ID!r} not found; the DAGs found are {sorted(dags)}")
    dag = dags[config.DELIVERY_DAG_ID]
    schedule = dag.schedule if isinstance(dag.schedule, str) else getattr(dag.timetable, "expression", None)
    assert schedule == "* * * * *"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert set(dag.params.keys()) == {"redeliver_failed", "channels", "max_deliveries"}
    sends = {t.task_id: t for t in dag.tasks if t.task_id.startswith("send_")}
    assert {tid: (t.pool, t.is_mapped) for tid, t in sends.items()} == {
        "send_urgent": (config.POOL_URGENT, True),
        **{f"send_{c}": (config.CHANNEL_POOLS[c], True) for c in config.CHANNELS},
    }
    urgent = sends["send_urgent"]
    assert (urgent.queue, urgent.priority_weight) == (config.QUEUE_URGENT, 100)
    assert len({config.CHANNEL_POOLS[c] for c in config.CHANNELS}) == len(config.CHANNELS)
