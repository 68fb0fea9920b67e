"""The "Notifications" view in a real browser: Debian's headless chromium, driven over the DevTools protocol.

No browser download and no Playwright: ``/usr/bin/chromium`` (``apt-get install -y chromium``) with a
remote-debugging port, and the ``websockets`` package that Airflow already installs. The test signs in
the Airflow way (a token from ``POST /auth/token`` in the UI's ``_token`` cookie), opens the UI route
of the plugin's nav entry (``/plugin/herald``, which shows ``/herald/`` in an iframe), reads the figures
from the page's DOM, and keeps screenshots under ``artifacts/e2e/`` (one of them becomes
``docs/monitoring.png`` with ``HERALD_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.e2e.browser import ARTIFACTS, DOCS_SCREENSHOT, sign_in

pytestmark = pytest.mark.slow

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
