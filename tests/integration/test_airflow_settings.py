"""``herald settings apply`` against a real Airflow metadata DB.

``airflow db migrate`` runs once per module in a temporary AIRFLOW_HOME (SQLite); each test gets a
copy of that migrated DB, so the tests do not depend on each other's order. ``herald`` and the
read-backs run as subprocesses, so Airflow reads its configuration fresh from that environment. A
Fernet key is set, as in a real deployment, so passwords, extras and variables are stored encrypted
and "unchanged" really means the decrypted values were compared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet

from herald.airflow_settings import SettingsFileError, load_settings_file
from herald.config import PROJECT_ROOT, defaults

BIN = Path(sys.executable).parent
SETTINGS_FILE = PROJECT_ROOT / "airflow_settings.yaml"
FERNET_KEY = Fernet.generate_key().decode()
LINE = re.compile(r"^(connection|pool|variable) (\S+): (created|changed|unchanged)(?: \((.*?)\))?")

# Reads the metadata DB through Airflow's models (not the secrets backends, which put the
# environment first) and prints one JSON document.
READ_STATE = """
import json
from sqlalchemy import select
from airflow.models.connection import Connection
from airflow.models.pool import Pool
from airflow.models.variable import Variable
from airflow.utils.session import create_session

with create_session() as s:
    state = {
        "connections": {
            c.conn_id: {
                "conn_type": c.conn_type, "host": c.host, "schema": c.schema, "login": c.login,
                "password": c.password, "port": c.port, "extra": json.loads(c.extra) if c.extra else {},
            }
            for c in s.scalars(select(Connection))
        },
        "pools": {p.pool: {"slots": p.slots, "description": p.description} for p in s.scalars(select(Pool))},
        "variables": {v.key: v.val for v in s.scalars(select(Variable))},
        "plaintext_variables": [v.key for v in s.scalars(select(Variable)) if not v.is_encrypted],
    }
print("STATE=" + json.dumps(state))
"""


@pytest.fixture(scope="module")
def migrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AIRFLOW_HOME whose SQLite metadata DB ``airflow db migrate`` has created."""
    home = tmp_path_factory.mktemp("airflow-home")
    result = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"],
        env=_airflow_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"airflow db migrate failed:\n{result.stdout}\n{result.stderr}"
    assert (home / "airflow.db").is_file()
    return home


@pytest.fixture
def env(migrated_home: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of an Airflow whose metadata DB is a fresh copy of the migrated one."""
    home = tmp_path / "airflow-home"
    home.mkdir()
    shutil.copy(migrated_home / "airflow.db", home / "airflow.db")
    return _airflow_env(home)


def _airflow_env(home: Path) -> dict[str, str]:
    # Nothing of the caller's Airflow may leak in: not its metadata DB, not AIRFLOW_CONN_/AIRFLOW_VAR_.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        AIRFLOW__CORE__FERNET_KEY=FERNET_KEY,
    )
    return env


def apply(env: dict[str, str], path: Path = SETTINGS_FILE, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "herald"), "settings", "apply", str(path), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def statuses(result: subprocess.CompletedProcess[str]) -> dict[tuple[str, str], tuple[str, str | None]]:
    """``{(kind, name): (status, changed fields)}`` from the report lines; Airflow's log lines are skipped."""
    assert result.returncode == 0, f"herald settings apply failed:\n{result.stdout}\n{result.stderr}"
    found = {}
    for line in result.stdout.splitlines():
        if m := LINE.match(line):
            found[(m[1], m[2])] = (m[3], m[4])
    return found


def read_state(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", READ_STATE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("STATE="))
    return json.loads(line.removeprefix("STATE="))


def settings_entries(data: dict[str, Any]) -> set[tuple[str, str]]:
    airflow = data["airflow"]
    return (
        {("connection", c["conn_id"]) for c in airflow["connections"]}
        | {("pool", p["pool_name"]) for p in airflow["pools"]}
        | {("variable", v["variable_name"]) for v in airflow["variables"]}
    )


def project_settings() -> dict[str, Any]:
    return yaml.safe_load(SETTINGS_FILE.read_text())


def write_settings(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_first_apply_creates_every_entry_of_the_project_file(env: dict[str, str]) -> None:
    report = statuses(apply(env))

    entries = settings_entries(project_settings())
    assert len(entries) == 4 + 5 + len(defaults())  # connections, pools, variables
    assert report == {entry: ("created", None) for entry in entries}
    state = read_state(env)
    assert state["connections"] == {
        "notifications_db": {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "schema": "herald",
            "login": "postgres",
            "password": None,
            "port": 5432,
            "extra": {},
        },
        "notifications_redis": {
            "conn_type": "redis",
            "host": "127.0.0.1",
            "schema": None,
            "login": None,
            "password": None,
            "port": 6379,
            "extra": {"db": 0},
        },
        "notifications_smtp": {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "schema": None,
            "login": None,
            "password": None,
            "port": 1025,
            "extra": {"from_email": "herald <notifications@example.test>", "disable_ssl": True,
                      "disable_tls": True, "timeout": 10, "retry_limit": 0},
        },
        "notifications_webhook": {  # its secret comes from the environment, never from the file
            "conn_type": "generic",
            "host": None,
            "schema": None,
            "login": None,
            "password": None,
            "port": None,
            "extra": {},
        },
    }
    assert {name: pool["slots"] for name, pool in state["pools"].items()} == {
        "default_pool": 128,  # Airflow's own, left alone
        "notifications": 8,
        "urgent_notifications": 4,
        "email_deliveries": 2,
        "webhook_deliveries": 2,
        "apprise_deliveries": 1,
    }
    assert state["pools"]["urgent_notifications"]["description"]
    assert state["variables"] == {name: str(value) for name, value in defaults().items()}
    assert state["plaintext_variables"] == []  # stored Fernet-encrypted, compared decrypted


def test_second_apply_creates_and_changes_nothing(env: dict[str, str]) -> None:
    first = statuses(apply(env))
    state = read_state(env)

    second = statuses(apply(env))

    assert set(second) == set(first)
    assert {status for status, _ in second.values()} == {"unchanged"}
    assert read_state(env) == state


@pytest.mark.parametrize(
    ("edit", "entry", "fields", "check"),
    [
        (
            lambda a: a["variables"][0].update(variable_value="25"),
            ("variable", "herald_rate_limit"),
            None,
            lambda s: s["variables"]["herald_rate_limit"] == "25",
        ),
        (
            lambda a: a["pools"][1].update(pool_slot=6),
            ("pool", "urgent_notifications"),
            "slots",
            lambda s: s["pools"]["urgent_notifications"]["slots"] == 6,
        ),
        (
            lambda a: a["connections"][1].update(conn_extra={"db": 3}),
            ("connection", "notifications_redis"),
            "extra",
            lambda s: s["connections"]["notifications_redis"]["extra"] == {"db": 3},
        ),
        (
            lambda a: a["connections"][0].update(conn_password="s3cret-Pa55word"),
            ("connection", "notifications_db"),
            "password",
            lambda s: s["connections"]["notifications_db"]["password"] == "s3cret-Pa55word",
        ),
    ],
    ids=["variable-value", "pool-slots", "connection-extra", "connection-password"],
)
def test_a_changed_value_reports_exactly_that_entry(env, tmp_path, edit, entry, fields, check) -> None:
    statuses(apply(env))
    data = project_settings()
    edit(data["airflow"])

    result = apply(env, write_settings(tmp_path / "edited.yaml", data))
    report = statuses(result)

    assert {e: s for e, s in report.items() if s[0] != "unchanged"} == {entry: ("changed", fields)}
    assert set(report) == settings_entries(data)
    assert check(read_state(env))
    assert "s3cret" not in result.stdout + result.stderr  # a password is never printed
    assert {s for s, _ in statuses(apply(env, tmp_path / "edited.yaml")).values()} == {"unchanged"}


def test_an_invalid_file_is_refused_whole_and_applies_nothing(env: dict[str, str], tmp_path: Path) -> None:
    before = read_state(env)
    data = project_settings()
    data["airflow"]["variables"].append(
        {"variable_name": "herald_only_in_the_bad_file", "variable_value": "1"}
    )
    del data["airflow"]["pools"][1]["pool_slot"]  # urgent_notifications

    result = apply(env, write_settings(tmp_path / "bad.yaml", data))

    assert result.returncode == 2, result.stderr  # herald's exit code for a refused file
    assert "pool 'urgent_notifications': missing pool_slot" in result.stderr
    assert not LINE.search(result.stdout)
    after = read_state(env)
    assert after == before
    assert "herald_only_in_the_bad_file" not in after["variables"]
    assert "notifications" not in after["pools"] and "notifications_db" not in after["connections"]


def test_dry_run_reports_what_would_change_and_writes_nothing(env: dict[str, str]) -> None:
    before = read_state(env)

    report = statuses(apply(env, SETTINGS_FILE, "--dry-run"))

    assert {status for status, _ in report.values()} == {"created"}
    assert read_state(env) == before


# --- validation alone: no Airflow needed, so these run in this process -------------------------


def test_the_project_file_parses_into_its_entries() -> None:
    settings = load_settings_file(SETTINGS_FILE)

    assert [c.name for c in settings.connections] == [
        "notifications_db", "notifications_redis", "notifications_smtp", "notifications_webhook"]
    assert settings.connections[1].extra == {"db": 0}
    assert settings.connections[2].extra["retry_limit"] == 0 and not settings.connections[3].password
    assert {p.name: p.slots for p in settings.pools} == {"notifications": 8, "urgent_notifications": 4,
                                                          "email_deliveries": 2, "webhook_deliveries": 2,
                                                          "apprise_deliveries": 1}
    assert {v.name: v.value for v in settings.variables} == {k: str(v) for k, v in defaults().items()}


def _drop(entry: dict[str, Any], key: str) -> None:
    del entry[key]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: _drop(a["pools"][1], "pool_slot"), "pool 'urgent_notifications': missing pool_slot"),
        (
            lambda a: a["pools"][0].update(pool_slot=-1),
            "pool 'notifications': pool_slot must be an integer >= 0",
        ),
        (lambda a: a["pools"][0].update(pool_slot="8"), "pool 'notifications': pool_slot must be an integer"),
        (lambda a: _drop(a["pools"][0], "pool_name"), "pool #1: missing pool_name"),
        (
            lambda a: _drop(a["connections"][1], "conn_type"),
            "connection 'notifications_redis': missing conn_type",
        ),
        (
            lambda a: a["connections"][0].update(conn_port="5432"),
            "connection 'notifications_db': conn_port must",
        ),
        (
            lambda a: a["connections"][1].update(conn_extra="[1]"),
            "connection 'notifications_redis': conn_extra",
        ),
        (
            lambda a: a["connections"].append(dict(a["connections"][0])),
            "'notifications_db': declared more than",
        ),
        (lambda a: a["variables"][2].update(value="1"), "variable 'herald_batch_size': unknown key 'value'"),
        (
            lambda a: a["variables"][0].update(variable_value=None),
            "variable 'herald_rate_limit': missing variable",
        ),
        (
            lambda a: a["variables"][0].update(variable_value=True),
            "'herald_rate_limit': variable_value must be a",
        ),
        (lambda a: a.update(pool=[]), "unknown key airflow.pool"),
    ],
)
def test_an_invalid_entry_is_named_in_the_error(tmp_path: Path, edit, message: str) -> None:
    data = project_settings()
    edit(data["airflow"])

    with pytest.raises(SettingsFileError, match=re.escape(message)):
        load_settings_file(write_settings(tmp_path / "bad.yaml", data))


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    data = project_settings()
    del data["airflow"]["pools"][0]["pool_slot"]
    data["airflow"]["variables"][0]["variable_value"] = None
    data["extra_top_level"] = 1

    with pytest.raises(SettingsFileError) as raised:
        load_settings_file(write_settings(tmp_path / "bad.yaml", data))

    message = str(raised.value)
    assert "pool 'notifications': missing pool_slot" in message
    assert "variable 'herald_rate_limit': missing variable_value" in message
    assert "unknown top-level key 'extra_top_level'" in message


@pytest.mark.parametrize("text", ["", "airflow: []\n", "- 1\n", "airflow: {pools: [", "connections: []\n"])
def test_a_file_without_an_airflow_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    with pytest.raises(SettingsFileError, match="bad.yaml"):
        load_settings_file(path)
