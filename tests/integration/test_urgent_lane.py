"""The urgent lane's wake-up trigger against the real database: LISTEN/NOTIFY, the poll, the watermark.

The trigger runs here in an asyncio loop of the test, as the triggerer would run it; the
notifications_db connection comes from ``AIRFLOW_CONN_NOTIFICATIONS_DB`` like in every Airflow process.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from herald import services
from herald.urgent import UrgentTriggersWaiting
from tests import factories as f


@pytest.fixture
def lane(pg, db_url, monkeypatch):
    env = services.environment(services.Services(db_url, None, "env", None))
    monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_DB", env["AIRFLOW_CONN_NOTIFICATIONS_DB"])
    pg.execute("UPDATE herald_urgent_lane SET signalled_through = 0, signalled_at = '-infinity'")
    f.add_users(pg, [1])
    return pg


def first_event(trigger: UrgentTriggersWaiting, timeout: float, before=None) -> tuple[dict | None, float]:
    """The trigger's first event within ``timeout`` seconds (None if none), and when it came.

    ``before`` runs once the trigger is listening (after its first look at the table).
    """
    async def main():
        started = time.monotonic()
        agen = trigger.run()
        task = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.5)  # connected, listening, first look done
        if before:
            await asyncio.to_thread(before)
        marked = time.monotonic()
        try:
            event = await asyncio.wait_for(task, timeout)
            return event.payload, time.monotonic() - marked
        except TimeoutError:
            return None, time.monotonic() - started
        finally:
            await agen.aclose()

    return asyncio.run(main())


def urgent(pg, user_id: int = 1) -> int:
    return f.add_trigger(pg, "security_alert", user_id=user_id, priority="urgent", payload={"message": "m"})


def test_an_urgent_insert_wakes_the_lane_at_its_commit_not_at_the_next_poll(lane):
    trigger = UrgentTriggersWaiting(poll_seconds=30)  # the poll cannot be what answers here
    event, after = first_event(trigger, 5, before=lambda: urgent(lane))
    assert event == {"waiting": 1, "through_trigger_id": 1}
    assert after < 1.0, f"woke {after:.2f} s after the commit"


def test_a_normal_insert_does_not_wake_it(lane):
    event, _ = first_event(UrgentTriggersWaiting(poll_seconds=0.2), 1.5, before=lambda: f.add_trigger(
        lane, "back_in_stock", user_id=1, payload={"item_name": "x"}))
    assert event is None


def test_a_lost_notification_costs_a_poll(lane):
    def insert_without_notify():
        with lane.transaction():
            lane.execute("SET LOCAL session_replication_role = replica")  # statement triggers do not fire
            urgent(lane)

    event, after = first_event(UrgentTriggersWaiting(poll_seconds=1.0), 5, before=insert_without_notify)
    assert event is not None and 0.0 < after < 2.0


def test_it_wakes_once_for_what_waits_and_again_only_for_newer_triggers_or_a_run_that_never_came(lane):
    first = urgent(lane)
    woken, _ = first_event(UrgentTriggersWaiting(poll_seconds=0.2), 3)
    assert woken == {"waiting": 1, "through_trigger_id": first}
    # Re-armed before the woken run claimed: no second wake-up, not even for a newer trigger (the run
    # that is coming takes every urgent trigger waiting when it claims) ...
    again, _ = first_event(UrgentTriggersWaiting(poll_seconds=0.2, stale_seconds=30), 1.5,
                           before=lambda: urgent(lane))
    assert again is None
    # ... until that run claimed what it was woken for: then a newer trigger wakes the lane ...
    lane.execute("UPDATE notification_triggers SET claimed_by = 'urgent-run',"
                 " claim_expires_at = now() + interval '10 minutes' WHERE id = %s", (first,))
    newer, _ = first_event(UrgentTriggersWaiting(poll_seconds=0.2), 3)
    assert newer == {"waiting": 1, "through_trigger_id": first + 1}
    # ... and if the woken run never comes, the same triggers wake it again once stale.
    stale, _ = first_event(UrgentTriggersWaiting(poll_seconds=0.2, stale_seconds=1), 3)
    assert stale == {"waiting": 1, "through_trigger_id": first + 1}


def test_triggers_a_run_holds_do_not_wake_it(lane):
    urgent(lane)
    lane.execute("UPDATE notification_triggers SET claimed_by = 'urgent-run',"
                 " claim_expires_at = now() + interval '10 minutes'")
    event, _ = first_event(UrgentTriggersWaiting(poll_seconds=0.2), 1.5)
    assert event is None
