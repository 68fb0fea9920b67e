"""Child processes herald starts (embedded servers, Airflow for ``herald up``, the benchmark, tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(
    proc: subprocess.Popen, *, first: signal.Signals = signal.SIGTERM, grace: float = 30
) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``) and everything in its process group.

    Sends ``first`` to the group and waits up to ``grace`` seconds, then SIGTERM (if ``first`` was
    another signal) and SIGKILL to whatever is left: the leader may be gone while its children
    (executor workers, uvicorn workers) are not.
    """
    steps = [(first, grace)]
    if first != signal.SIGTERM:
        steps.append((signal.SIGTERM, 15))
    steps.append((signal.SIGKILL, 10))
    for sig, wait in steps:
        proc.poll()  # reap the leader if it is done, so it does not count as alive
        if not _live_members(proc.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while _live_members(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _live_members(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting for a parent's reaping do not)."""
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
