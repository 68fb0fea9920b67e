"""``herald up --executor celery`` as a test fixture, and the listeners a test points it at.

:func:`start_herald_up` runs the real command (``herald up --executor celery --no-seed``) in a process
group of its own, with a temporary ``AIRFLOW_HOME``, a metadata database of its own, a Celery key
prefix and a Redis namespace of its own, scheduled runs off, and whatever extra environment the test
gives (``SENTRY_DSN``, ``HERALD_STATSD``, ``HERALD_FAULT_ONCE``). :class:`HeraldUp` then drives it with
Airflow's CLI (the environment ``herald up`` wrote to ``herald.env``) and reads the metadata database,
the supervisor's state file and the components' logs.

:class:`StatsdListener` is a UDP socket that keeps every StatsD line it receives; :class:`SentryEndpoint`
is an HTTP server posing as a Sentry DSN that keeps every event envelope it receives.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from herald.processes import alive
from tests.e2e.airflow_procs import Cluster

HERALD = Path(sys.executable).with_name("herald")
STARTUP_TIMEOUT_SECONDS = 240
#: What a Celery worker logs for each task it takes: ``[<celery task id>] Executing workload ... ti=...``.
WORKLOAD_LINE = re.compile(
    r"\[(?P<celery_id>[0-9a-f-]{36})\] Executing workload in Celery: .*?ti=TaskInstanceDTO\("
    r".*?task_id='(?P<task_id>[^']+)', dag_id='(?P<dag_id>[^']+)', run_id='(?P<run_id>[^']+)', "
    r"try_number=(?P<try_number>\d+),.*?map_index=(?P<map_index>-?\d+),"
)


# ------------------------------------------------------------------------------------------ listeners


class StatsdListener:
    """A UDP socket on 127.0.0.1 that records every StatsD line (``name:value|type``) it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statsd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except OSError:
                continue
            now = time.time()
            self.lines.extend((now, line) for line in data.decode(errors="replace").splitlines() if line)

    def since(self, started: float, prefix: str) -> list[tuple[str, float, str]]:
        """``(name, value, type)`` of the lines received after ``started`` whose name starts with ``prefix``."""
        out = []
        for when, line in list(self.lines):
            if when < started or not line.startswith(prefix):
                continue
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            out.append((name, float(value), kind.split("|")[0]))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class SentryEndpoint:
    """An HTTP server posing as a Sentry DSN: keeps each envelope's raw bytes and its parsed items."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                received.append({"path": self.path, "time": time.time(), "raw": body,
                                 "items": _envelope_items(body)})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.dsn = f"http://herald-test-key@127.0.0.1:{self.port}/4242"
        self._thread = threading.Thread(target=self.server.serve_forever, name="sentry", daemon=True)
        self._thread.start()

    def events(self, since: float = 0.0) -> list[tuple[dict[str, Any], bytes]]:
        """Error events received after ``since``, with the raw envelope each came in."""
        return [(item, r["raw"]) for r in list(self.received) if r["time"] >= since
                for kind, item in r["items"] if kind == "event"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _envelope_items(body: bytes) -> list[tuple[str, Any]]:
    """The items of a Sentry envelope: a header line, then (item header line, payload line) pairs."""
    lines = body.split(b"\n")
    items = []
    i = 1
    while i + 1 < len(lines):
        try:
            header = json.loads(lines[i])
            payload = json.loads(lines[i + 1])
        except ValueError:
            payload = None
            header = {}
        items.append((header.get("type", ""), payload))
        i += 2
    return items


# ---------------------------------------------------------------------------------------- herald up


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        (item,) = shlex.split(line)
        key, _, value = item.partition("=")
        env[key] = value
    return env


@dataclass
class HeraldUp(Cluster):
    """A running ``herald up --executor celery``; ``Cluster`` gives the metadata-DB and CLI helpers."""

    process: subprocess.Popen | None = None
    output: Path | None = None
    password: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- the command and its processes

    @property
    def state_file(self) -> Path:
        return self.home / "herald-up.json"

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def component_pid(self, name: str) -> int | None:
        return (self.state().get("components", {}).get(name) or {}).get("pid")

    def component_log(self, name: str) -> Path:
        return self.home / "herald-up" / f"{name}.log"

    def tree(self) -> list[psutil.Process]:
        """herald up and every process below it (the supervisor is a subreaper: nothing escapes)."""
        assert self.process is not None
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"herald up exited with {self.process.returncode}\n{self.logs()}")

    def logs(self, lines: int = 60) -> str:
        parts = []
        if self.output:
            parts.append(f"===== herald up ({self.output}) =====\n" + _tail(self.output, lines))
        for name in ("api-server", "scheduler", "worker-urgent", "worker-default"):
            path = self.component_log(name)
            parts.append(f"===== {name} ({path}) =====\n" + _tail(path, lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------- API and CLI

    def token(self) -> str:
        response = httpx.post(f"{self.api_url}/auth/token", json={"username": "admin", "password": self.password},
                              timeout=30)
        assert response.status_code == 201, (response.status_code, response.text)
        return response.json()["access_token"]

    @property
    def base_url(self) -> str:  # what tests.e2e.browser.sign_in expects
        return self.api_url

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.api_url}/herald/api/stats", headers={"Authorization": f"Bearer {self.token()}"},
                             timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def workloads(self, worker: str) -> dict[str, dict[str, Any]]:
        """Celery task id -> the task instance a worker's own log says it executed."""
        out = {}
        for line in _read(self.component_log(worker)).splitlines():
            match = WORKLOAD_LINE.search(line)
            if match:
                out[match["celery_id"]] = {**match.groupdict(), "try_number": int(match["try_number"]),
                                           "map_index": int(match["map_index"])}
        return out

    def executed_tries(self, run_id: str, task_id: str) -> list[dict[str, Any]]:
        """Every try of ``task_id`` in the run (current and history) with its Celery task id."""
        return self.query(
            "SELECT map_index, try_number, state, queue, external_executor_id FROM task_instance"
            " WHERE run_id = %(r)s AND task_id = %(t)s AND try_number > 0"
            " UNION ALL SELECT map_index, try_number, state, queue, external_executor_id FROM task_instance_history"
            " WHERE run_id = %(r)s AND task_id = %(t)s ORDER BY 1, 2", {"r": run_id, "t": task_id})

    def stop(self) -> None:
        """Ctrl-C, as in a terminal (tests that check what is left call :meth:`interrupt` themselves)."""
        if self.process is not None and self.process.poll() is None:
            self.interrupt()
            try:
                self.process.wait(180)
            except subprocess.TimeoutExpired:
                for p in self.tree():
                    with _suppress():
                        p.kill()
                self.process.wait(30)

    def interrupt(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], psutil.Error)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int) -> str:
    return "\n".join(_read(path).splitlines()[-lines:]) or "(no log)"


@contextmanager
def start_herald_up(
    *, home: Path, db_url: str, redis_url: str, metadata_db: str, metadata_url: str, api_port: int,
    key_prefix: str, namespace: str, log_dir: Path, extra: Mapping[str, str] | None = None,
    executor: str = "celery",
) -> Iterator[HeraldUp]:
    """Run ``herald up --executor <executor> --no-seed`` until the API answers and every component runs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "HERALD_", "SENTRY_")) and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "HERALD_UI_PORT": str(api_port),
        "HERALD_AIRFLOW_DATABASE": metadata_db,
        "HERALD_CELERY_KEY_PREFIX": key_prefix,
        "AIRFLOW_VAR_HERALD_CACHE_NAMESPACE": namespace,
        # Only the runs a test triggers: a */2 cron run would race them for the same triggers.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    })
    log_dir.mkdir(parents=True, exist_ok=True)
    output = log_dir / "herald-up.log"
    with output.open("w") as out:
        process = subprocess.Popen([str(HERALD), "up", "--executor", executor, "--no-seed"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # as in a terminal: its own foreground group
    up = HeraldUp(home=home, env={}, metadata_url=metadata_url, api_port=api_port, log_dir=log_dir,
                  process=process, output=output, extra=dict(extra or {}))
    try:
        up.wait_for(lambda: (home / "herald.env").exists(), STARTUP_TIMEOUT_SECONDS, "herald.env")
        up.env = read_env_file(home / "herald.env")
        up.env.update({k: v for k, v in env.items() if k not in up.env})
        up.password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        components = 6 if executor == "celery" else 1
        up.wait_for(lambda: len([p for p in up.state().get("components", {}).values() if p["pid"]]) == components,
                    STARTUP_TIMEOUT_SECONDS, "the supervisor to start every component")
        up.wait_for(up._api_healthy, STARTUP_TIMEOUT_SECONDS, "the api-server to answer")
        if executor == "celery":
            for worker in ("worker-urgent", "worker-default"):
                up.wait_for(lambda w=worker: " ready." in _read(up.component_log(w)), STARTUP_TIMEOUT_SECONDS,
                            f"{worker} to be ready")
        yield up
    finally:
        up.stop()
        left = [p for p in psutil.process_iter() if p.pid != os.getpid() and _in_home(p, home)]
        for p in left:
            with _suppress():
                p.kill()


def _in_home(p: psutil.Process, home: Path) -> bool:
    """A process started for this home (its command line or its log file names it)."""
    try:
        return str(home) in " ".join(p.cmdline()) or any(str(home) in f.path for f in p.open_files())
    except psutil.Error:
        return False


def listening_ports(procs: list[psutil.Process]) -> set[tuple[str, int]]:
    out = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return out


def still_running(snapshot: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    return [p for p in snapshot if alive(p[0], p[1])]


def answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
