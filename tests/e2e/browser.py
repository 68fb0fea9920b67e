"""Debian's headless Chromium driven over the DevTools protocol, for the browser tests.

No browser download and no Playwright: ``/usr/bin/chromium`` (``apt-get install -y chromium``) with a
remote-debugging port, and the ``websockets`` package that Airflow already installs. The ``browser``
fixture (``tests/e2e/conftest.py``) starts one per test in a process group of its own and stops it by id.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from herald.config import PROJECT_ROOT

CHROMIUM = os.environ.get("HERALD_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "artifacts" / "e2e"
DOCS_SCREENSHOT = PROJECT_ROOT / "docs" / "monitoring.png"
DOCS_SCREENSHOT_CELERY = PROJECT_ROOT / "docs" / "monitoring-celery.png"
#: Flags this machine needs: no sandbox as root, no GPU, and no network of the browser's own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1440,1000",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page (commands in, results out; events ignored)."""

    def __init__(self, ws_url: str) -> None:
        self._ws = connect(ws_url, max_size=None, open_timeout=30)
        self._ids = itertools.count(1)

    def __call__(self, method: str, timeout: float = 30, **params: Any) -> dict:
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 45) -> Any:
        """Evaluate until the value is truthy; return it."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {expression!r} (last value {value!r})")

    def screenshot(self, path: Path) -> Path:
        data = self("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._ws.close()


@contextmanager
def chromium() -> Iterator[DevTools]:
    """A headless Chromium with one page, in a process group of its own, stopped by id at the end."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"no chromium at {CHROMIUM}: install Debian's with "
            "`apt-get update && apt-get install -y chromium` "
            "(or set HERALD_CHROMIUM to a Chromium/Chrome binary)"
        )
    profile = Path(tempfile.mkdtemp(prefix="herald-chromium-"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = (ARTIFACTS / "chromium.log").open("w")
    process = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped as a whole, by id
    )
    devtools = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(
                    f"chromium did not start (exit {process.poll()}):\n"
                    f"{(ARTIFACTS / 'chromium.log').read_text()[-3000:]}"
                )
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
    finally:
        if devtools is not None:
            devtools.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


def sign_in(devtools: DevTools, airflow_server: Any) -> None:
    """What the Airflow login does for the browser: the JWT in the ``_token`` cookie.

    ``airflow_server`` is anything with ``base_url`` and ``token()``.
    """
    devtools("Network.enable")
    devtools(
        "Network.setCookie",
        name="_token",
        value=airflow_server.token(),
        url=airflow_server.base_url + "/",
        path="/",
        httpOnly=False,
    )


