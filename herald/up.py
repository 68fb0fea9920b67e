"""``herald up``: everything a newcomer needs to watch real runs, then ``airflow standalone``.

Finds or starts PostgreSQL and Redis, migrates the notifications database, prepares an Airflow home
under ``.herald/airflow`` (unless ``AIRFLOW_HOME`` is set), applies ``airflow_settings.yaml``, loads the
demo data set once, and runs ``airflow standalone`` with the DAGs unpaused. Ctrl-C stops Airflow and
any embedded server this command started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from herald import db, services, workload
from herald.config import PROJECT_ROOT
from herald.processes import stop_process_group

log = logging.getLogger(__name__)

UI_PORT = int(os.environ.get("HERALD_UI_PORT", "8080"))
ADMIN_USER = "admin"


def airflow_environment(found: services.Services, airflow_home: Path) -> dict[str, str]:
    """The environment every Airflow process of the demo runs with."""
    env = dict(os.environ)
    env.update(services.environment(found))
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__API__PORT": str(UI_PORT),
        "AIRFLOW__API__HOST": "127.0.0.1",
    })
    # `airflow standalone` starts its components as `airflow ...` commands: the venv must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{UI_PORT}/execution/")
    return env


def _admin_password(airflow_home: Path) -> str:
    """The demo admin's password: kept in Airflow's simple-auth password file, made once."""
    path = airflow_home / "simple_auth_manager_passwords.json.generated"
    if path.exists():
        try:
            return json.loads(path.read_text())[ADMIN_USER]
        except (KeyError, ValueError):
            pass
    password = secrets.token_urlsafe(12)
    path.write_text(json.dumps({ADMIN_USER: password}))
    return password


def _airflow(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, check=True)


def main(args: argparse.Namespace) -> int:
    airflow_home = Path(os.environ.get("AIRFLOW_HOME") or PROJECT_ROOT / ".herald" / "airflow")
    airflow_home.mkdir(parents=True, exist_ok=True)
    with services.ensure_services() as found:
        print(f"PostgreSQL: {found.database_source}; Redis: {found.redis_source}")
        with db.connection(found.database_url) as conn:
            applied = db.migrate(conn)
            print(f"notifications database migrated ({len(applied)} new migrations)")
            conn.autocommit = True
            if not args.no_seed:
                has_users = conn.execute("SELECT EXISTS (SELECT 1 FROM users)").fetchone()[0]
                if has_users:
                    print("demo data: users already present, not seeding again")
                else:
                    print(workload.seed(conn, workload.WorkloadSpec()))
        env = airflow_environment(found, airflow_home)
        password = _admin_password(airflow_home)
        _airflow(env, "db", "migrate")
        subprocess.run([str(Path(sys.executable).parent / "herald"), "settings", "apply"], env=env, check=True)
        if args.no_airflow:
            print(f"ready; AIRFLOW_HOME={airflow_home}")
            return 0
        print(
            f"\nStarting Airflow: UI at http://127.0.0.1:{UI_PORT}/ (user {ADMIN_USER}, password {password})\n"
            f"notification_batch runs every two minutes; the queue is the Notifications entry of the navigation bar.\n"
            "Ctrl-C stops Airflow and any embedded PostgreSQL/Redis this command started.\n"
        )
        # Its own process group: we decide how it stops. Ctrl-C and SIGTERM both stop Airflow first,
        # then (leaving the with block) the embedded servers.
        proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"], env=env,
                                start_new_session=True)
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # standalone stops its components on SIGINT (on SIGTERM it would leave them running)
            stop_process_group(proc, first=signal.SIGINT, grace=60)
            return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
