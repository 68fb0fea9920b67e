"""Run the processes of a topology as one unit that nothing outlives: ``herald up``'s supervisor.

``herald up`` does its set-up (services, migrations, settings), then hands the list of processes to a
supervisor: ``python -m herald.services.supervisor``, started in a session of its own, reading the plan
as one JSON line on its stdin. The supervisor

- makes itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): a process whose parent dies is
  re-parented to the supervisor instead of init, so every process started below it (Celery pool
  processes, Airflow's task supervisors and task processes, which put themselves in process groups of
  their own) stays in its tree, where it can be found and stopped;
- starts each component in a process group of its own, with ``PR_SET_PDEATHSIG`` so that a component
  gets a signal if the supervisor itself is killed;
- restarts a component that exits unexpectedly (with a back-off, and gives up after repeated
  failures), after killing what is left of it; a component without restart ends the whole unit;
- stops everything when asked (SIGTERM: ``herald up`` on Ctrl-C) **or when ``herald up`` is gone**,
  however it died, even by SIGKILL: the plan pipe reads end-of-file, and ``PR_SET_PDEATHSIG`` sends the
  supervisor SIGTERM. Stopping sends each component its stop signal in the plan's order, waits for its
  process group, kills what is left, then sweeps its whole tree until no descendant remains;
- when ``herald up`` died, also stops the embedded PostgreSQL/Valkey it had started, if no other live
  process uses them (``embedded.reap_orphans``);
- writes its state (supervisor pid, each component's pid, log and restarts; no secrets) to
  ``state_file``, for operators and tests.

:class:`Handle` is the ``herald up`` side.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from herald.processes import alive, become_subreaper, die_with_parent

#: Back-off between restarts of a component: 1, 2, 4, ... seconds, at most this.
MAX_BACKOFF_SECONDS = 30.0
#: A component restarted this many times within RESTART_WINDOW_SECONDS makes the supervisor give up.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 120.0
TICK_SECONDS = 0.2


@dataclass
class Component:
    """One process of a topology (``argv[0]`` an absolute path or a command on the plan's PATH)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    #: File for the process's stdout and stderr; None: the supervisor's own (the terminal).
    log: str | None = None
    stop_signal: int = int(signal.SIGTERM)
    #: Seconds between the stop signal and SIGKILL for what is left of the process group.
    grace: float = 30.0
    restart: bool = True
    #: Send the stop signal to the whole process group (True) or to the component's own process only,
    #: for one that stops its children itself (``airflow standalone``: SIGINT to it, SIGTERM from it to them).
    signal_group: bool = True


@dataclass
class Plan:
    components: list[Component]
    #: Names, in the order they are stopped (components not listed are stopped last, in reverse start order).
    stop_order: list[str] = field(default_factory=list)
    state_file: str | None = None
    #: ``herald up``'s pid: when it is gone, the supervisor stops everything.
    parent_pid: int = 0
    #: The embedded servers' directory when ``herald up`` started embedded servers (reaped if it dies).
    embedded_root: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["components"] = [Component(**c) for c in data["components"]]
        return cls(**data)


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:60] or p.name()
    except psutil.Error:
        return "?"


def _say(message: str) -> None:
    print(f"herald up: {message}", file=sys.stderr, flush=True)


@dataclass
class _Running:
    component: Component
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    restart_at: float | None = None
    exits: int = 0


class Supervisor:
    def __init__(self, plan: Plan, control_fd: int | None = None) -> None:
        self.plan = plan
        self.control_fd = control_fd
        self.running = {c.name: _Running(c) for c in plan.components}
        self._stop = threading.Event()
        self.stop_reason = ""
        self.exit_code = 0
        self.parent_gone = False

    # ------------------------------------------------------------------------------------ lifecycle

    def request_stop(self, reason: str, *, parent_gone: bool = False, code: int = 0) -> None:
        if not self._stop.is_set():
            self.stop_reason, self.exit_code = reason, code
            self.parent_gone = self.parent_gone or parent_gone
            self._stop.set()

    def _watch_control(self) -> None:
        """End of file on the plan pipe: ``herald up`` is gone (or closed it to ask for a stop)."""
        assert self.control_fd is not None
        with contextlib.suppress(OSError):
            while os.read(self.control_fd, 4096):  # a raw read: no buffer lock held at interpreter exit
                pass
        self.request_stop("herald up is gone", parent_gone=not alive(self.plan.parent_pid))

    def _on_signal(self, signum: int, frame: Any) -> None:
        parent_gone = signum == signal.SIGTERM and bool(self.plan.parent_pid) and not alive(self.plan.parent_pid)
        reason = f"{signal.Signals(signum).name} received" + (", herald up is gone" if parent_gone else "")
        self.request_stop(reason, parent_gone=parent_gone)

    def run(self) -> int:
        become_subreaper()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        if self.plan.parent_pid:
            die_with_parent(signal.SIGTERM, parent=self.plan.parent_pid)()  # SIGTERM here when herald up dies
            if not alive(self.plan.parent_pid):
                self.request_stop("herald up is gone", parent_gone=True)
        if self.control_fd is not None:
            threading.Thread(target=self._watch_control, name="control", daemon=True).start()
        try:
            for name in self.running:
                if self._stop.is_set():
                    break
                self._start(name)
            self._write_state()
            while not self._stop.wait(TICK_SECONDS):
                self._reap()
                self._restart_due()
        finally:
            _say(f"stopping ({self.stop_reason or 'exiting'})")
            self._stop_all()
            if self.parent_gone and self.plan.embedded_root:
                from herald.services import embedded

                embedded.reap_orphans(Path(self.plan.embedded_root))
            self._write_state()
            _say("everything stopped")
        return self.exit_code

    # ----------------------------------------------------------------------------------- processes

    def _start(self, name: str) -> None:
        entry = self.running[name]
        c = entry.component
        if c.log:
            Path(c.log).parent.mkdir(parents=True, exist_ok=True)
            out: Any = open(c.log, "ab")  # noqa: SIM115 - the child keeps its own copy
        else:
            out = None
        try:
            entry.process = subprocess.Popen(
                c.argv, env=c.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM),
            )
        finally:
            if out is not None:
                out.close()
        entry.restart_at = None
        _say(f"started {name} (pid {entry.process.pid})" + (f", log {c.log}" if c.log else ""))
        self._write_state()

    def _reap(self) -> None:
        """Collect every exited child: components (restart or stop) and adopted orphans (just reaped)."""
        by_pid = {e.process.pid: e for e in self.running.values() if e.process is not None}
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            entry = by_pid.get(info.si_pid)
            if entry is None or entry.process is None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.si_pid, 0)  # an adopted orphan
                continue
            code = entry.process.wait()
            self._exited(entry, code)
        self._kill_orphans()

    def _kill_orphans(self) -> None:
        """Direct children that are not components were orphaned by a component that died: kill them."""
        components = {e.process.pid for e in self.running.values() if e.process is not None}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children():
                if child.pid not in components:
                    with contextlib.suppress(psutil.Error):
                        if child.status() != psutil.STATUS_ZOMBIE:
                            _say(f"killing orphan {child.pid} ({child.name()})")
                            child.kill()

    def _exited(self, entry: _Running, code: int) -> None:
        c = entry.component
        pgid = entry.process.pid if entry.process else None
        entry.process = None
        entry.exits += 1
        if self._stop.is_set():
            return
        _say(f"{c.name} exited with code {code}")
        if pgid:
            self._kill_group(pgid, signal.SIGKILL, 5)  # what is left of it (pool processes, children)
        if not c.restart:
            self.request_stop(f"{c.name} exited", code=code if code > 0 else (1 if code else 0))
            return
        now = time.monotonic()
        entry.restarts = [t for t in entry.restarts if now - t < RESTART_WINDOW_SECONDS] + [now]
        if len(entry.restarts) > MAX_RESTARTS:
            self.request_stop(f"{c.name} failed {len(entry.restarts)} times in {RESTART_WINDOW_SECONDS:.0f}s",
                              code=1)
            return
        delay = min(MAX_BACKOFF_SECONDS, 2.0 ** (len(entry.restarts) - 1))
        entry.restart_at = now + delay
        _say(f"restarting {c.name} in {delay:.0f}s")

    def _restart_due(self) -> None:
        now = time.monotonic()
        for name, entry in self.running.items():
            if entry.process is None and entry.restart_at is not None and now >= entry.restart_at:
                self._start(name)

    # -------------------------------------------------------------------------------------- stopping

    @staticmethod
    def _members(pgid: int) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return out

    def _group_alive(self, pgid: int) -> bool:
        return bool(self._members(pgid))

    def _kill_group(self, pgid: int, sig: int, wait: float, *, leader_only: bool = False) -> bool:
        """Send ``sig`` to the group (or its leader) and wait up to ``wait`` seconds for the group to empty."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if leader_only:
                os.kill(pgid, sig)
            else:
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while self._group_alive(pgid):
            if time.monotonic() > deadline:
                return False
            self._reap_quietly()
            time.sleep(0.1)
        return True

    def _reap_quietly(self) -> None:
        """Reap exited children while stopping (components' exit codes no longer matter)."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for entry in self.running.values():
                if entry.process is not None and entry.process.pid == pid:
                    entry.process.returncode = _status
                    entry.process = None

    def _stop_order(self) -> list[str]:
        listed = [n for n in self.plan.stop_order if n in self.running]
        rest = [n for n in reversed(list(self.running)) if n not in listed]
        return listed + rest

    def _stop_all(self) -> None:
        for name in self._stop_order():
            entry = self.running[name]
            if entry.process is None:
                continue
            c, pgid = entry.component, entry.process.pid
            started = time.monotonic()
            if not self._kill_group(pgid, c.stop_signal, c.grace, leader_only=not c.signal_group):
                left = ", ".join(f"{p.pid} {_title(p)}" for p in self._members(pgid)[:6])
                _say(f"{name} still running {c.grace:.0f}s after {signal.Signals(c.stop_signal).name} ({left}): "
                     "SIGKILL")
                if c.stop_signal != signal.SIGTERM:
                    self._kill_group(pgid, signal.SIGTERM, 10)
                self._kill_group(pgid, signal.SIGKILL, 10)
            else:
                _say(f"stopped {name} in {time.monotonic() - started:.1f}s")
            entry.process = None
        self._sweep()

    def _sweep(self) -> None:
        """Stop every remaining descendant (the subreaper keeps them all in this tree)."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
            self._reap_quietly()
            try:
                left = [p for p in psutil.Process().children(recursive=True)
                        if p.status() != psutil.STATUS_ZOMBIE]
            except psutil.Error:
                left = []
            if not left:
                return
            _say(f"{len(left)} leftover process(es): {sig.name} to {[p.pid for p in left]}")
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(alive(p.pid) for p in left):
                self._reap_quietly()
                time.sleep(0.1)
        self._reap_quietly()

    def _write_state(self) -> None:
        if not self.plan.state_file:
            return
        state = {
            "supervisor": os.getpid(),
            "parent": self.plan.parent_pid,
            "stopping": self._stop.is_set(),
            "components": {
                name: {
                    "pid": e.process.pid if e.process is not None else None,
                    "log": e.component.log,
                    "restarts": e.exits,
                }
                for name, e in self.running.items()
            },
        }
        path = Path(self.plan.state_file)
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(path)


# ------------------------------------------------------------------------------------ herald up side


class Handle:
    """A running supervisor, seen from ``herald up``."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    @classmethod
    def start(cls, plan: Plan, python: str | None = None) -> Handle:
        """Start the supervisor with ``plan``; the pipe stays open for as long as this process lives."""
        plan.parent_pid = os.getpid()
        # No PR_SET_PDEATHSIG here: a SIGTERM arriving before the supervisor's handlers exist would kill
        # it silently. It sets that up itself once it can clean up, and then checks that we still live.
        process = subprocess.Popen(
            [python or sys.executable, "-m", "herald.services.supervisor"],
            stdin=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the terminal reaches herald up only, which stops it in order
        )
        assert process.stdin is not None
        process.stdin.write(plan.to_json().encode() + b"\n")
        process.stdin.flush()
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 300) -> int:
        """Ask the supervisor to stop everything and wait for it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # its components get SIGTERM (PR_SET_PDEATHSIG)
            return self.process.wait(30)


def main(argv: Sequence[str] | None = None) -> int:
    # The plan is the first line on stdin, read without Python's buffering so that the rest of the pipe
    # (end of file when herald up is gone) is left to the control thread.
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            _say("no plan on stdin")
            return 2
        line += chunk
    plan = Plan.from_json(line.decode())
    return Supervisor(plan, control_fd=0).run()


if __name__ == "__main__":
    sys.exit(main())
