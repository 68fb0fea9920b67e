"""Child processes herald starts (embedded servers, Airflow for ``herald up``, the benchmark, tests)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import psutil

#: ``prctl(2)`` options (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


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


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}) failed: {os.strerror(errno)}")


def die_with_parent(sig: signal.Signals = signal.SIGTERM, parent: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the process (thread) that started it dies.

    Linux's ``PR_SET_PDEATHSIG``. If the parent is already gone by the time the child runs this (it
    died between ``fork`` and here), the child sends ``sig`` to itself. ``parent`` defaults to the
    calling process (right for a ``preexec_fn``); a process applying it to itself passes its parent's pid.
    """
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    A descendant whose parent dies is re-parented to this process instead of init, so every process
    started below this one, even one that left its session or process group, stays in its tree.
    """
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def alive(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` runs (zombies count as gone); with ``started``, only if it is that same process."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 0.5
    except psutil.Error:
        return False
