"""herald's process supervisor with real processes: nothing it started outlives ``herald up``.

A *driver* process plays ``herald up``: it hands the supervisor a plan of small Python programs that
behave like Airflow's components where it matters (one forks a grandchild that leaves its session and
renames itself, as Airflow's task processes do; one listens on a TCP port; one crashes), then waits.
The tests stop the driver the two ways it ends in real life, Ctrl-C (a clean stop) and SIGKILL, and
check that every process of the tree is gone and the port is closed; and that a crashing component is
restarted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from herald.processes import alive, free_port

#: A component that forks a child, which forks a grandchild in a new session with a new title; all sleep.
TREE = textwrap.dedent(
    """
    import os, sys, time
    if os.fork() == 0:
        if os.fork() == 0:
            os.setsid()
            from setproctitle import setproctitle
            setproctitle("herald-test grandchild")
        time.sleep(3600)
    time.sleep(3600)
    """
)
#: A component that listens on 127.0.0.1:<port>.
LISTENER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
    time.sleep(3600)
    """
)
#: A component that ignores SIGTERM (the supervisor must escalate to SIGKILL after its grace).
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
CRASHY = "import time; time.sleep(0.5); raise SystemExit(3)"

DRIVER = textwrap.dedent(
    """
    import json, signal, sys
    from herald.services.supervisor import Component, Handle, Plan
    spec = json.loads(sys.argv[1])
    env = dict(__import__("os").environ)
    components = [Component(name=n, argv=[sys.executable, "-c", code, *args], env=env, log=spec["logs"] + f"/{n}.log",
                            grace=3.0, restart=restart)
                  for n, code, args, restart in spec["components"]]
    handle = Handle.start(Plan(components=components, state_file=spec["state"]))
    print(json.dumps({"supervisor": handle.pid}), flush=True)
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, stop)
    try:
        sys.exit(handle.wait())
    except KeyboardInterrupt:
        sys.exit(handle.stop(timeout=60))
    """
)


def start_driver(tmp_path: Path, components: list) -> tuple[subprocess.Popen, dict, Path]:
    state = tmp_path / "state.json"
    spec = {"components": components, "logs": str(tmp_path), "state": str(state)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    assert driver.stdout is not None
    started = json.loads(driver.stdout.readline())
    return driver, started, state


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def tree_of(pid: int) -> list[psutil.Process]:
    return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def component_pids(state: Path) -> dict[str, int]:
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return {}
    return {name: c["pid"] for name, c in data["components"].items() if c["pid"]}


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def snapshot(driver: subprocess.Popen) -> list[tuple[int, float, str]]:
    return [(p.pid, p.create_time(), p.name()) for p in tree_of(driver.pid)]


def assert_all_gone(procs: list[tuple[int, float, str]], timeout: float) -> None:
    def gone() -> bool:
        return not [p for p in procs if alive(p[0], p[1])]

    try:
        wait_for(gone, timeout, "every process of the tree to exit")
    except AssertionError:
        left = [p for p in procs if alive(p[0], p[1])]
        raise AssertionError(f"still running: {left}") from None


@pytest.fixture
def components() -> list:
    port = free_port()
    return [["tree", TREE, [], True], ["listener", LISTENER, [str(port)], True],
            ["stubborn", STUBBORN, [], True]], port


def test_sigkill_of_herald_up_leaves_nothing_running(tmp_path: Path, components) -> None:
    specs, port = components
    driver, started, state = start_driver(tmp_path, specs)
    try:
        wait_for(lambda: len(component_pids(state)) == 3 and listening(port), 30, "the components")
        # tree: component, child, grandchild (own session, renamed) + listener + stubborn + supervisor + driver
        # (by its new name: it renames itself after it starts, so counting the tree is not enough)
        renamed = lambda: [p for p in tree_of(driver.pid) if p.name().startswith("herald-test")]  # noqa: E731
        wait_for(lambda: len(tree_of(driver.pid)) >= 7 and renamed(), 30, "the renamed grandchild")
        procs = snapshot(driver)
        grandchild = renamed()
        assert grandchild and os.getsid(grandchild[0].pid) != os.getsid(started["supervisor"])
        driver.kill()
        driver.wait(10)
        # The supervisor sees herald up gone, stops each component (SIGKILL for the stubborn one after its
        # 3 s grace) and sweeps the orphaned grandchild.
        assert_all_gone(procs, 30)
        assert not listening(port)
    finally:
        for pid, created, _name in snapshot(driver) if driver.poll() is None else []:
            if alive(pid, created):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_everything_in_order(tmp_path: Path, components) -> None:
    specs, port = components
    driver, started, state = start_driver(tmp_path, specs)
    wait_for(lambda: len(component_pids(state)) == 3 and listening(port), 30, "the components")
    wait_for(lambda: len(tree_of(driver.pid)) >= 7, 30, "the grandchild")
    procs = snapshot(driver)
    os.killpg(driver.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the foreground group
    assert driver.wait(60) == 0
    assert_all_gone(procs, 5)  # already gone when herald up returns
    assert not listening(port)
    final = json.loads(state.read_text())
    assert final["stopping"] is True and all(c["pid"] is None for c in final["components"].values())


EMBEDDED_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from herald import services
    from herald.services.supervisor import Component, Handle, Plan
    with services.ensure_services(database="herald_test_sup_embedded") as found:
        sleeper = Component(name="sleeper", argv=[sys.executable, "-c", "import time; time.sleep(3600)"],
                            env={}, log=None)
        handle = Handle.start(Plan(components=[sleeper], embedded_root=str(services.embedded_dir())))
        print(json.dumps({"supervisor": handle.pid, "pg": found.database_pid, "redis": found.redis_pid,
                          "sources": [found.database_source, found.redis_source]}), flush=True)
        time.sleep(3600)
    """
)


def test_sigkill_of_herald_up_also_stops_the_embedded_servers_it_started(tmp_path: Path) -> None:
    """herald up on a machine without PostgreSQL and Redis: its embedded servers are its children too."""
    embedded = Path(tempfile.mkdtemp(prefix="herald-test-sup-"))  # not under /tmp/pytest-of-root (0700)
    embedded.chmod(0o755)
    nothing = f"127.0.0.1:{free_port()}"
    cleared = ("DATABASE_URL", "REDIS_URL", "AIRFLOW_CONN_NOTIFICATIONS_DB", "AIRFLOW_CONN_NOTIFICATIONS_REDIS")
    env = {k: v for k, v in os.environ.items() if k not in cleared}
    env.update(HERALD_EMBEDDED_DIR=str(embedded / "e"), HERALD_LOCAL_PG=nothing, HERALD_LOCAL_REDIS=nothing)
    errors = tmp_path / "driver-stderr.log"  # the supervisor's messages too
    with errors.open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-c", EMBEDDED_DRIVER], env=env, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, start_new_session=True)
    servers: list[int] = []
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line, f"driver exited with {driver.wait(60)}"
        report = json.loads(line)
        assert report["sources"] == ["embedded", "embedded"]
        servers = [report["pg"], report["redis"], report["supervisor"]]
        assert all(alive(pid) for pid in servers)
        driver.kill()
        driver.wait(10)
        try:
            wait_for(lambda: not any(alive(pid) for pid in servers), 60, "the supervisor to stop the servers")
        except AssertionError:
            raise AssertionError(f"still running: {[p for p in servers if alive(p)]}\n{errors.read_text()}") from None
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in [p for p in servers if alive(p)]:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(embedded, ignore_errors=True)


def test_a_crashing_component_is_restarted_and_the_others_keep_running(tmp_path: Path) -> None:
    driver, started, state = start_driver(tmp_path, [["crashy", CRASHY, [], True], ["tree", TREE, [], True]])
    try:
        first = wait_for(lambda: component_pids(state).get("tree"), 30, "tree")
        # exits after 0.5 s each time; back-off 1, 2, 4 s: at least two restarts within ~8 s
        wait_for(lambda: json.loads(state.read_text())["components"]["crashy"]["restarts"] >= 2, 30,
                 "two restarts of crashy")
        assert component_pids(state)["tree"] == first and alive(first)
    finally:
        os.killpg(driver.pid, signal.SIGINT)
        assert driver.wait(60) == 0


def test_a_component_without_restart_ends_the_unit(tmp_path: Path) -> None:
    driver, started, state = start_driver(tmp_path, [["crashy", CRASHY, [], False], ["tree", TREE, [], True]])
    wait_for(lambda: component_pids(state).get("tree"), 30, "tree")
    procs = snapshot(driver)
    assert driver.wait(60) == 3  # the component's exit code is the unit's
    assert_all_gone(procs, 5)
