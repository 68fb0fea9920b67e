"""herald.services against real servers: environment, Airflow connections, local and embedded servers.

Nothing here flushes a Redis database: each test writes its own keys and deletes them. The only
databases created and dropped are named ``herald_test_svc_*``. Embedded servers live in a temporary
directory (``HERALD_EMBEDDED_DIR``), and "local" is pointed at a port where nothing listens whenever
a test needs the embedded path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import psutil
import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict

from herald import services

LOCAL_PG = services.LOCAL_PG
LOCAL_REDIS = services.LOCAL_REDIS

CLEARED = (
    "DATABASE_URL",
    "REDIS_URL",
    "AIRFLOW_CONN_NOTIFICATIONS_DB",
    "AIRFLOW_CONN_NOTIFICATIONS_REDIS",
    "HERALD_LOCAL_PG",
    "HERALD_LOCAL_REDIS",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def embedded_scratch_dir() -> Iterator[Path]:
    """A directory for embedded servers, removed afterwards.

    Not under pytest's ``tmp_path``: as root the embedded PostgreSQL runs as another user, which must
    traverse every parent directory, and each new pytest session resets ``/tmp/pytest-of-root`` to 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="herald-test-svc-"))
    path.chmod(0o755)
    try:
        yield path / "embedded"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pg_address(url: str) -> tuple[str, int]:
    params = conninfo_to_dict(url)
    return str(params["host"]), int(params["port"])


def redis_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def pg_trust_works(address: tuple[str, int]) -> bool:
    try:
        with psycopg.connect(host=address[0], port=address[1], user="postgres", dbname="postgres",
                             connect_timeout=3) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def redis_pings(address: tuple[str, int]) -> bool:
    client = redis.Redis(host=address[0], port=address[1], socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def current_database(url: str) -> str:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def key_only_in_db(url: str, db: int) -> bool:
    """SET a fresh key through ``url``; True when it landed in database ``db`` and not in another one."""
    key = f"herald-test-svc:{uuid.uuid4().hex}"
    host, port = redis_address(url)
    client = redis.Redis.from_url(url)
    other = redis.Redis(host=host, port=port, db=15 if db != 15 else 14)  # from_url: the URL's db wins
    direct = redis.Redis(host=host, port=port, db=db)
    try:
        client.set(key, "1", ex=60)
        return direct.get(key) == b"1" and other.get(key) is None
    finally:
        client.delete(key)
        for c in (client, other, direct):
            c.close()


@pytest.fixture(scope="module")
def trust_servers() -> Iterator[dict[str, tuple[str, int]]]:
    """A real PostgreSQL (user postgres, trust) and Redis on 127.0.0.1.

    The local ones on the standard ports when they answer, otherwise embedded ones started for this
    module, so that the tests below run the same way on a machine without any server.
    """
    found = {"pg": LOCAL_PG, "redis": LOCAL_REDIS}
    need_pg, need_redis = not pg_trust_works(LOCAL_PG), not redis_pings(LOCAL_REDIS)
    if not (need_pg or need_redis):
        yield found
        return
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        for var in CLEARED:
            mp.delenv(var, raising=False)
        nothing = f"127.0.0.1:{free_port()}"
        mp.setenv("HERALD_EMBEDDED_DIR", str(stack.enter_context(embedded_scratch_dir())))
        mp.setenv("HERALD_LOCAL_PG", nothing)
        mp.setenv("HERALD_LOCAL_REDIS", nothing)
        started = stack.enter_context(
            services.ensure_services(need_redis=need_redis, database="herald_test_svc_trust")
        )
        mp.undo()  # the servers keep running; the tests set their own variables
        if need_pg:
            found["pg"] = pg_address(started.database_url)
        if need_redis and started.redis_url:
            found["redis"] = redis_address(started.redis_url)
        yield found


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No service variables from the caller; embedded servers go to this test's own directory."""
    for var in CLEARED:
        monkeypatch.delenv(var, raising=False)
    with embedded_scratch_dir() as embedded:
        monkeypatch.setenv("HERALD_EMBEDDED_DIR", str(embedded))
        yield embedded


@pytest.fixture
def scratch_db(trust_servers: dict[str, tuple[str, int]]) -> Iterator[tuple[str, str]]:
    """(name, url) of a fresh database on the trust server, dropped afterwards."""
    host, port = trust_servers["pg"]
    admin = f"postgresql://postgres@{host}:{port}/postgres"
    name = f"herald_test_svc_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = services.create_database(admin, name, drop_first=True)
    yield name, url
    services.drop_database(admin, name)


def point_local_at(monkeypatch: pytest.MonkeyPatch, variable: str, address: tuple[str, int],
                   default: tuple[str, int]) -> None:
    if address == default:
        monkeypatch.delenv(variable, raising=False)  # exercise the built-in default
    else:
        monkeypatch.setenv(variable, f"{address[0]}:{address[1]}")


# --------------------------------------------------------------------------------------------------


def test_environment_urls_win_over_airflow_connections_and_local_servers(
    monkeypatch: pytest.MonkeyPatch, trust_servers: dict[str, tuple[str, int]], scratch_db: tuple[str, str]
) -> None:
    name, url = scratch_db
    rhost, rport = trust_servers["redis"]
    redis_env = f"redis://{rhost}:{rport}/4"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("REDIS_URL", redis_env)
    # Everything below would give other answers if it were consulted.
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_DB", f"postgres://postgres@127.0.0.1:{free_port()}/nope")
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_REDIS", f"redis://127.0.0.1:{free_port()}/?db=9")
    point_local_at(monkeypatch, "HERALD_LOCAL_PG", trust_servers["pg"], LOCAL_PG)

    with services.ensure_services(database="herald_test_svc_unused") as found:
        assert (found.database_source, found.redis_source) == ("env", "env")
        assert found.database_url == url
        assert found.redis_url == redis_env
        assert (found.database_pid, found.redis_pid) == (None, None)
        assert current_database(found.database_url) == name
        assert key_only_in_db(found.redis_url, 4)


@pytest.mark.parametrize("form", ["uri", "json"])
def test_airflow_connection_variables_are_understood(
    form: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    trust_servers: dict[str, tuple[str, int]],
    scratch_db: tuple[str, str],
) -> None:
    name, _ = scratch_db
    host, port = trust_servers["pg"]
    rhost, rport = trust_servers["redis"]
    password = "s3cr:t/p@ss"  # trust authentication ignores it; it must survive the round trip
    if form == "uri":
        pg_conn = (
            f"postgresql://postgres:{quote(password, safe='')}@{host}:{port}/{name}"
            "?application_name=herald-svc-uri"
        )
        redis_conn = f"redis://{rhost}:{rport}/?db=5"
    else:
        pg_conn = json.dumps({
            "conn_type": "postgres", "host": host, "port": str(port), "login": "postgres",
            "password": password, "schema": name,
            "extra": {"application_name": "herald-svc-json", "cursor": "realdictcursor"},
        })
        redis_conn = json.dumps({"conn_type": "redis", "host": rhost, "port": rport, "extra": '{"db": 5}'})
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_DB", pg_conn)
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_REDIS", redis_conn)
    caplog.set_level(logging.INFO, logger="herald.services")

    with services.ensure_services() as found:
        assert (found.database_source, found.redis_source) == ("airflow", "airflow")
        params = conninfo_to_dict(found.database_url)
        assert params["password"] == password
        assert "cursor" not in params  # an Airflow-only extra is not a libpq parameter
        with psycopg.connect(found.database_url) as conn:
            row = conn.execute("SELECT current_database(), current_setting('application_name')").fetchone()
        assert row == (name, f"herald-svc-{form}")
        assert found.redis_url == f"redis://{rhost}:{rport}/5"
        assert key_only_in_db(found.redis_url, 5)

    assert "PostgreSQL (airflow)" in caplog.text and "Redis (airflow)" in caplog.text
    assert password not in caplog.text and quote(password, safe="") not in caplog.text


def test_environment_is_understood_by_airflow_hooks_and_by_ensure_services(
    monkeypatch: pytest.MonkeyPatch, trust_servers: dict[str, tuple[str, int]], scratch_db: tuple[str, str]
) -> None:
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.providers.redis.hooks.redis import RedisHook

    name, url = scratch_db
    host, port = trust_servers["pg"]
    rhost, rport = trust_servers["redis"]
    given = services.Services(
        database_url=f"postgresql://postgres:{quote('p@ss/w:rd', safe='')}@{host}:{port}/{name}",
        redis_url=f"redis://{rhost}:{rport}/2",
        database_source="env",
        redis_source="env",
    )
    env = services.environment(given)
    assert env["DATABASE_URL"] == given.database_url and env["REDIS_URL"] == given.redis_url
    assert env["AIRFLOW_CONN_NOTIFICATIONS_REDIS"] == f"redis://{rhost}:{rport}/?db=2"
    assert env["AIRFLOW_CONN_NOTIFICATIONS_DB"].startswith("postgres://")

    for var in ("AIRFLOW_CONN_NOTIFICATIONS_DB", "AIRFLOW_CONN_NOTIFICATIONS_REDIS"):
        monkeypatch.setenv(var, env[var])

    conn = PostgresHook.get_connection("notifications_db")
    assert (conn.conn_type, conn.host, conn.port, conn.login, conn.password, conn.schema) == (
        "postgres", host, port, "postgres", "p@ss/w:rd", name,
    )
    assert PostgresHook(postgres_conn_id="notifications_db").get_first("SELECT current_database()") == (name,)
    hook_client = RedisHook(redis_conn_id="notifications_redis").get_conn()
    try:
        assert int(hook_client.connection_pool.connection_kwargs["db"]) == 2
        key = f"herald-test-svc:{uuid.uuid4().hex}"
        hook_client.set(key, "x", ex=60)
        try:
            assert redis.Redis(host=rhost, port=rport, db=2).get(key) == b"x"
        finally:
            hook_client.delete(key)
    finally:
        hook_client.close()

    # With only the Airflow connections set, ensure_services lands on the same servers.
    with services.ensure_services() as found:
        assert (found.database_source, found.redis_source) == ("airflow", "airflow")
        assert conninfo_to_dict(found.database_url) == conninfo_to_dict(given.database_url)
        assert found.redis_url == given.redis_url


def test_local_servers_are_found_when_they_answer(
    monkeypatch: pytest.MonkeyPatch, isolated_env: Path, trust_servers: dict[str, tuple[str, int]]
) -> None:
    point_local_at(monkeypatch, "HERALD_LOCAL_PG", trust_servers["pg"], LOCAL_PG)
    point_local_at(monkeypatch, "HERALD_LOCAL_REDIS", trust_servers["redis"], LOCAL_REDIS)
    name = f"herald_test_svc_local_{os.getpid()}"
    host, port = trust_servers["pg"]
    admin = f"postgresql://postgres@{host}:{port}/postgres"
    services.drop_database(admin, name)
    try:
        with services.ensure_services(database=name) as found:
            assert (found.database_source, found.redis_source) == ("local", "local")
            assert pg_address(found.database_url) == trust_servers["pg"]
            assert current_database(found.database_url) == name  # created because it was missing
            rhost, rport = trust_servers["redis"]
            assert found.redis_url == f"redis://{rhost}:{rport}/0"
            assert redis.Redis.from_url(found.redis_url).ping() is True
        assert not isolated_env.exists()  # nothing embedded was started
    finally:
        services.drop_database(admin, name)


def test_need_redis_false_does_not_look_for_redis(
    monkeypatch: pytest.MonkeyPatch, isolated_env: Path, trust_servers: dict[str, tuple[str, int]]
) -> None:
    point_local_at(monkeypatch, "HERALD_LOCAL_PG", trust_servers["pg"], LOCAL_PG)
    point_local_at(monkeypatch, "HERALD_LOCAL_REDIS", trust_servers["redis"], LOCAL_REDIS)  # would answer
    with services.ensure_services(need_redis=False, database="postgres") as found:
        assert found.database_source == "local"
        assert (found.redis_url, found.redis_source, found.redis_pid) == (None, None, None)
    assert not (isolated_env / "valkey").exists()


def test_embedded_servers_start_share_persist_and_stop(
    monkeypatch: pytest.MonkeyPatch, isolated_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nothing = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("HERALD_LOCAL_PG", nothing)
    monkeypatch.setenv("HERALD_LOCAL_REDIS", nothing)
    caplog.set_level(logging.INFO, logger="herald.services")
    name = "herald_test_svc_embedded"

    with services.ensure_services(database=name) as found:
        assert (found.database_source, found.redis_source) == ("embedded", "embedded")
        assert found.database_pid and found.redis_pid
        pg_host, pg_port = pg_address(found.database_url)
        r_host, r_port = redis_address(found.redis_url or "")
        assert (pg_host, r_host) == ("127.0.0.1", "127.0.0.1")
        assert (pg_port, r_port) != (LOCAL_PG[1], LOCAL_REDIS[1])
        assert (isolated_env / "postgres" / "data" / "PG_VERSION").is_file()
        with psycopg.connect(found.database_url, autocommit=True) as conn:
            row = conn.execute("SELECT current_database(), pg_backend_pid()").fetchone()
            assert row is not None and row[0] == name
            assert psutil.Process(row[1]).ppid() == found.database_pid  # backends are the postmaster's
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('across restarts')")
        client = redis.Redis.from_url(found.redis_url or "")
        assert client.ping() is True
        assert int(client.info("server")["process_id"]) == found.redis_pid
        client.set("herald-test-svc:k", "v")
        assert client.get("herald-test-svc:k") == b"v"
        client.close()

        # A second context in the same process shares the servers and does not stop them.
        with services.ensure_services(database=name) as inner:
            assert (inner.database_pid, inner.redis_pid) == (found.database_pid, found.redis_pid)
            assert inner.database_url == found.database_url and inner.redis_url == found.redis_url
        assert alive(found.database_pid) and alive(found.redis_pid)
        assert current_database(found.database_url) == name

    assert not alive(found.database_pid)
    assert not alive(found.redis_pid)
    assert not answers(pg_host, pg_port) and not answers(r_host, r_port)
    assert list((isolated_env / "valkey").iterdir()) == []  # Valkey's run files are removed
    assert "PostgreSQL (embedded)" in caplog.text and "Redis (embedded)" in caplog.text

    # The data directory is kept: a new server on it still has the table.
    with services.ensure_services(need_redis=False, database=name) as again:
        assert again.database_source == "embedded" and again.database_pid != found.database_pid
        with psycopg.connect(again.database_url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("across restarts",)]
    assert not alive(again.database_pid or 0)


CHILD = textwrap.dedent(
    """
    import json, sys, time
    from herald import services
    with services.ensure_services(database="herald_test_svc_child") as found:
        print(json.dumps({"pg": found.database_pid, "redis": found.redis_pid,
                          "sources": [found.database_source, found.redis_source]}), flush=True)
        time.sleep(120)
    """
)


def start_child(isolated_env: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    nothing = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(HERALD_EMBEDDED_DIR=str(isolated_env), HERALD_LOCAL_PG=nothing, HERALD_LOCAL_REDIS=nothing)
    errors = isolated_env.parent / "child-stderr.log"
    with open(errors, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=stderr, text=True,
        )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"child exited with {child.wait(timeout=30)}: {errors.read_text()}"
    report = json.loads(line)
    assert report["sources"] == ["embedded", "embedded"]
    assert alive(report["pg"]) and alive(report["redis"])
    return child, report


def test_sigterm_stops_the_embedded_servers(isolated_env: Path) -> None:
    child, report = start_child(isolated_env)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 128 + signal.SIGTERM  # SystemExit from herald's handler
    assert not alive(report["pg"])  # type: ignore[arg-type]
    assert not alive(report["redis"])  # type: ignore[arg-type]


def test_servers_left_by_a_killed_process_are_adopted_or_removed(
    monkeypatch: pytest.MonkeyPatch, isolated_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    child, report = start_child(isolated_env)
    child.kill()
    child.wait(timeout=30)
    old_pg, old_redis = int(report["pg"]), int(report["redis"])  # type: ignore[call-overload]
    assert alive(old_pg) and alive(old_redis)  # orphans

    nothing = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("HERALD_LOCAL_PG", nothing)
    monkeypatch.setenv("HERALD_LOCAL_REDIS", nothing)
    caplog.set_level(logging.INFO, logger="herald.services")
    with services.ensure_services(database="herald_test_svc_child") as found:
        assert found.database_pid == old_pg  # the PostgreSQL is adopted ...
        assert "adopting embedded PostgreSQL" in caplog.text
        assert current_database(found.database_url) == "herald_test_svc_child"
        assert not alive(old_redis)  # ... the dead process's Valkey is stopped, a new one started
        assert found.redis_pid != old_redis and alive(found.redis_pid or 0)
    assert not alive(old_pg) and not alive(found.redis_pid or 0)


def test_create_and_drop_database(trust_servers: dict[str, tuple[str, int]]) -> None:
    host, port = trust_servers["pg"]
    admin = f"postgresql://postgres@{host}:{port}/postgres"
    name = f"herald_test_svc_db_{os.getpid()}"

    def exists() -> bool:
        with psycopg.connect(admin) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None

    url = services.create_database(admin, name, drop_first=True)
    try:
        assert exists() and current_database(url) == name
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (id int)")
        assert services.create_database(admin, name) == url  # already there: kept as it is
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('marker') IS NOT NULL").fetchone() == (True,)
        services.create_database(admin, name, drop_first=True)  # recreated empty
        conn = psycopg.connect(url, autocommit=True)
        try:
            assert conn.execute("SELECT to_regclass('marker') IS NOT NULL").fetchone() == (False,)
            services.drop_database(admin, name)  # even with a connection open (WITH FORCE)
        finally:
            conn.close()
        assert not exists()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5).close()
    finally:
        services.drop_database(admin, name)


def test_redact_url_hides_passwords() -> None:
    assert services.redact_url("postgresql://u:s3cret@h:5/db") == "postgresql://u:***@h:5/db"
    assert services.redact_url("redis://:s3cret@h:6/0") == "redis://:***@h:6/0"
    assert services.redact_url("host=h password=s3cret dbname=d") == "host=h password=*** dbname=d"
    assert services.redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
