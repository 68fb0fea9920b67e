"""The "Notifications" view in a real browser: Debian's headless chromium, driven over the DevTools protocol.

No browser download and no Playwright: ``/usr/bin/chromium`` (``apt-get install -y chromium``) with a
remote-debugging port, and the ``websockets`` package that Airflow already installs. The test signs in
the Airflow way (a token from ``POST /auth/token`` in the UI's ``_token`` cookie), opens the UI route
of the plugin's nav entry (``/plugin/herald``, which shows ``/herald/`` in an iframe), reads the figures
from the page's DOM, and keeps screenshots under ``artifacts/e2e/`` (one of them becomes
``docs/monitoring.png`` with ``HERALD_UPDATE_SCREENSHOT=1``).
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
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from herald.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("HERALD_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "artifacts" / "e2e"
DOCS_SCREENSHOT = PROJECT_ROOT / "docs" / "monitoring.png"
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


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
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


def sign_in(devtools: DevTools, airflow_server) -> None:
    """What the Airflow login does for the browser: the JWT in the ``_token`` cookie."""
    devtools("Network.enable")
    devtools(
        "Network.setCookie",
        name="_token",
        value=airflow_server.token(),
        url=airflow_server.base_url + "/",
        path="/",
        httpOnly=False,
    )


#: Figures of the herald page, read inside the UI's iframe (same origin) or in the page itself.
READ_FIGURES = """
(() => {
  const frame = document.querySelector('iframe');
  const doc = frame ? frame.contentDocument : document;
  if (!doc || !doc.body || doc.body.dataset.state !== 'ok') return null;
  const text = (id) => doc.getElementById(id).textContent.trim();
  return {
    embedded: !!frame,
    backlog: text('backlog-total'), normal: text('backlog-normal'), urgent: text('backlog-urgent'),
    held: text('claims-held'), expired: text('claims-expired'),
    delivered_hour: text('hour-delivered'), cache: text('cache-ratio'),
    failed: [...doc.querySelectorAll('#failed td.reason')].map((td) => td.textContent),
    runs: doc.querySelectorAll('#runs tr').length,
    bars: doc.querySelectorAll('#chart-delivered rect').length,
    status: text('status'),
    executor: text('executor-name'), queues_note: text('queues-note'),
    queues_table: !doc.getElementById('queues-table').hidden,
  };
})()
"""


def test_notifications_view_in_the_airflow_ui(airflow_server, seeded, browser):
    sign_in(browser, airflow_server)
    browser("Page.enable")
    browser("Page.navigate", url=f"{airflow_server.base_url}/plugin/herald")

    figures = browser.wait_for(READ_FIGURES)
    assert figures["embedded"] is True, "the UI route should show the page in its iframe"
    assert figures["backlog"] == str(seeded["backlog"]["total"])
    assert (figures["normal"], figures["urgent"]) == ("37", "5")
    assert (figures["held"], figures["expired"]) == ("3", "2")
    assert figures["delivered_hour"] == "1,234"
    assert figures["cache"] == "90.0%"
    assert figures["failed"] == seeded["failed_reasons"]
    assert figures["runs"] == len(seeded["recent_runs"])
    assert figures["bars"] == 24
    # LocalExecutor: the queue panel says there are no queues instead of showing a table of zeros
    assert figures["executor"] == "LocalExecutor" and figures["queues_table"] is False
    assert "ignores task queues" in figures["queues_note"]
    # the nav entry registered by external_views is in the UI around the iframe
    assert browser.wait_for("document.body.innerText.includes('Notifications')")
    time.sleep(0.5)  # let the chart settle after layout
    shot = browser.screenshot(ARTIFACTS / "notifications-in-airflow-ui.png")
    assert shot.stat().st_size > 20_000
    if os.environ.get("HERALD_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_page_without_a_session_shows_no_figures(airflow_server, seeded, browser):
    """Opened directly without signing in: the page itself is refused, so no figure reaches the browser."""
    browser("Page.enable")
    browser("Page.navigate", url=f"{airflow_server.base_url}/herald/")
    body = browser.wait_for("document.readyState === 'complete' && document.body.innerText")
    assert "Not authenticated" in body or "Forbidden" in body, body[:300]
    assert "42" not in body


def test_standalone_page_refreshes_itself(airflow_server, seeded, browser, pg):
    """Opened directly (/herald/) after signing in; a change in the queue shows up on the next refresh."""
    sign_in(browser, airflow_server)
    browser("Page.enable")
    browser("Page.navigate", url=f"{airflow_server.base_url}/herald/")
    figures = browser.wait_for(READ_FIGURES)
    assert figures["embedded"] is False and figures["backlog"] == "42"
    browser.screenshot(ARTIFACTS / "notifications-page.png")

    pg.execute(
        "UPDATE notification_triggers SET status = 'done', processed_at = now() WHERE priority = 'urgent'"
    )
    # the page asks again every 15 s
    browser.wait_for("document.getElementById('backlog-total').textContent.trim() === '37'", timeout=40)
    assert browser.evaluate("document.getElementById('backlog-urgent').textContent.trim()") == "0"
