"""``herald up``: everything a newcomer needs to watch real runs, then Airflow, as one unit.

Finds or starts PostgreSQL and Redis, migrates the notifications database, creates Airflow's metadata
database next to it (``herald_airflow``), prepares an Airflow home under ``.herald/airflow`` (unless
``AIRFLOW_HOME`` is set), applies ``airflow_settings.yaml``, loads the demo data set once, then starts
the processes of the chosen mode (:mod:`herald.services.topology`) under a supervisor
(:mod:`herald.services.supervisor`):

- ``--executor local`` (default): ``airflow standalone``;
- ``--executor celery``: api-server, scheduler, dag-processor, triggerer, an ``urgent`` and a
  ``default`` Celery worker.

Ctrl-C (or SIGTERM) stops every process, then any embedded server this command started. If this
command is killed outright (SIGKILL), the supervisor notices and stops everything itself.
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
import time
from pathlib import Path

import httpx

from herald import db, services, workload
from herald.config import PROJECT_ROOT
from herald.services import topology
from herald.services.embedded import answers
from herald.services.supervisor import Handle

UI_PORT = int(os.environ.get("HERALD_UI_PORT", "8080"))
ADMIN_USER = topology.ADMIN_USER
READY_TIMEOUT_SECONDS = 300


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


def _port_free(port: int) -> bool:
    return not answers("127.0.0.1", port, timeout=0.5)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness polls
    mode = getattr(args, "executor", "local")
    airflow_home = Path(os.environ.get("AIRFLOW_HOME") or PROJECT_ROOT / ".herald" / "airflow")
    airflow_home.mkdir(parents=True, exist_ok=True)
    if not args.no_airflow and not _port_free(UI_PORT):
        print(f"herald up: something already listens on 127.0.0.1:{UI_PORT}; stop it or set HERALD_UI_PORT",
              file=sys.stderr)
        return 2
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
        metadata_url = None
        if not os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
            metadata_url = _metadata_database(found, airflow_home)
            print(f"Airflow metadata database: {services.redact_url(metadata_url)}")
        topo = topology.build(mode, found=found, metadata_url=metadata_url, airflow_home=airflow_home,
                              api_port=UI_PORT)
        password = _admin_password(airflow_home)
        env_file = topo.write_env_file(airflow_home / "herald.env")
        print(f"shared environment: {env_file} (`set -a; . {env_file}; set +a` before `airflow ...` commands)")
        _airflow(topo.env, "db", "migrate")
        subprocess.run([str(Path(sys.executable).parent / "herald"), "settings", "apply"], env=topo.env,
                       check=True)
        if args.no_airflow:
            print(f"ready; AIRFLOW_HOME={airflow_home}")
            return 0
        embedded_root = (services.embedded_dir()
                         if "embedded" in (found.database_source, found.redis_source) else None)
        return _run(topo, airflow_home, password, embedded_root)


def _metadata_database(found: services.Services, airflow_home: Path) -> str:
    """Airflow's database on herald's server; recreated when its Airflow home (and so its keys) is new.

    Connection passwords and Variables are encrypted with the Fernet key of ``herald-secrets.json`` in the
    Airflow home. A home made afresh (deleted ``.herald/airflow``) cannot read a database an earlier home
    wrote, so that database is dropped and made again (its run history goes with the old home).
    """
    url = services.metadata_database(found)
    try:
        if json.loads((airflow_home / topology.SECRETS_FILE).read_text()).get("fernet_key"):
            return url  # the key that wrote the database
    except (OSError, ValueError):
        pass
    with db.connection(url, autocommit=True) as conn:
        used = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]
    if not used:
        return url
    from psycopg.conninfo import conninfo_to_dict

    name = str(conninfo_to_dict(url)["dbname"])
    print(f"Airflow home {airflow_home} is new, so it cannot decrypt the metadata database {name} an earlier "
          "home wrote: recreating that database")
    services.drop_database(found.database_url, name)
    return services.metadata_database(found)


def _run(topo: topology.Topology, airflow_home: Path, password: str, embedded_root: Path | None) -> int:
    sizing = topo.sizing
    names = ", ".join(c.name for c in topo.components)
    print(
        f"\nStarting Airflow ({topo.mode} mode: {names}); parallelism {sizing.parallelism}"
        + (f", worker concurrency urgent {sizing.urgent_concurrency} / default {sizing.default_concurrency}"
           if topo.mode == "celery" else "")
        + f".\nUI at {topo.api_url}/ (user {ADMIN_USER}, password {password}); state in "
        f"{airflow_home / 'herald-up.json'}.\n"
        "notification_batch runs every two minutes; the queue is the Notifications entry of the navigation bar.\n"
        "Ctrl-C stops every Airflow process and any embedded PostgreSQL/Redis this command started.\n",
        flush=True,
    )
    handle = Handle.start(topo.plan(state_file=airflow_home / "herald-up.json", embedded_root=embedded_root))
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not _healthy(topo.api_url):
            code = handle.poll()
            if code is not None:
                print(f"herald up: Airflow stopped before it was ready (exit {code})", file=sys.stderr)
                return code or 1
            if time.monotonic() > deadline:
                print(f"herald up: the API server did not answer within {READY_TIMEOUT_SECONDS}s; still waiting",
                      file=sys.stderr)
                break
            time.sleep(1)
        else:
            print(f"herald up: ready, UI at {topo.api_url}/", flush=True)
        return handle.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("herald up: stopping Airflow (this takes a few seconds)", flush=True)
        handle.stop()
        return 0
