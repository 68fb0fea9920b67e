"""``herald verify`` finds each kind of violation planted in a real database, and nothing in a healthy one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from herald import pipeline, verify
from herald.claiming import ClaimRequest
from tests import factories as f

HERALD = Path(sys.executable).with_name("herald")


def herald_verify(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN")} | {"DATABASE_URL": db_url}
    return subprocess.run([str(HERALD), "verify", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def healthy(pg, redis_client, settings) -> dict[str, int]:
    """A database after a real run: delivered, skipped, rate-limited and digest-folded outcomes."""
    f.add_users(pg, range(1, 31))
    f.add_favorites(pg, range(1, 31), "item", 1)
    f.disable(pg, 3, "price_drop")
    pg.execute("INSERT INTO user_channels (user_id, channel, address) VALUES (2, 'email', 'u2@example.test'),"
               " (3, 'webhook', 'https://hooks.example.test/3')")  # deliveries written: no missing_delivery
    ids = {"fanout": f.add_trigger(pg, "price_drop", entity=("item", 1))}
    for i in range(25):
        ids[f"direct{i}"] = f.add_trigger(pg, "back_in_stock", user_id=7, payload={"item_name": f"i{i}"})
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    return ids


def test_a_healthy_database_passes_every_check(db_url, pg, healthy, settings):
    assert pg.execute("SELECT count(*) FROM notification_deliveries").fetchone()[0] == 1  # user 3 disabled the type
    assert pg.execute("SELECT count(*) FROM notification_outcomes WHERE outcome = 'rate_limited'").fetchone()[0] > 0
    report = verify.verify(pg, settings)
    assert report.ok, report.describe()
    assert report.counts == dict.fromkeys(verify.KINDS, 0)
    done = herald_verify(db_url, "--since", "1h")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"all {len(verify.KINDS)} checks clean" in done.stdout


def test_each_kind_of_violation_is_found_and_named(db_url, pg, healthy, settings):
    fanout, direct = healthy["fanout"], healthy["direct0"]
    # outcome_count: a done trigger that promised one more recipient than it has outcomes
    pg.execute("UPDATE notification_triggers SET recipient_count = recipient_count + 1 WHERE id = %s", (direct,))
    # duplicate_outcome: user 2 of the fan-out has a notification, and now an outcome row too
    pg.execute("INSERT INTO notification_outcomes (trigger_id, user_id, outcome) VALUES (%s, 2, 'rate_limited')",
               (fanout,))
    # over_limit: user 9 got 21 normal notifications within the hour
    pg.execute("INSERT INTO notifications (user_id, notification_type, title, body, priority)"
               " SELECT 9, 'price_drop', 't', 'b', 'normal' FROM generate_series(1, %s)", (settings.rate_limit,))
    # undigested: user 11 is owed a digest since two hours ago and has budget
    pg.execute("INSERT INTO notification_outcomes (trigger_id, user_id, outcome, created_at)"
               " VALUES (999999, 11, 'rate_limited', now() - interval '2 hours')")
    # expired_claim: a claim whose run died twenty minutes ago, never taken over
    orphan = f.add_trigger(pg, "price_drop", entity=("item", 1))
    pg.execute("UPDATE notification_triggers SET claimed_by = 'dead-run',"
               " claim_expires_at = now() - interval '20 minutes' WHERE id = %s", (orphan,))

    # missing_delivery: user 4 had an email channel before the fan-out, and has no delivery for it
    pg.execute("INSERT INTO user_channels (user_id, channel, address, created_at)"
               " VALUES (4, 'email', 'u4@example.test', now() - interval '1 day')")
    lost_for = scalar(pg, "SELECT id FROM notifications WHERE trigger_id = %s AND user_id = 4", (fanout,))
    # expired_delivery_claim: a delivery run died twenty minutes ago holding a delivery
    dead = scalar(pg, "INSERT INTO notification_deliveries (notification_id, user_id, channel, address, claimed_by,"
                      " claim_batch, claim_expires_at) VALUES (%s, 4, 'webhook', 'https://x.test/4', 'dead-delivery',"
                      " 0, now() - interval '20 minutes') RETURNING id", (lost_for,))
    # overdue_delivery: due for twenty minutes and nobody claimed it (the delivery DAG is paused)
    overdue = scalar(pg, "INSERT INTO notification_deliveries (notification_id, user_id, channel, address,"
                         " next_attempt_at) VALUES (%s, 4, 'apprise', 'json://x.test/4',"
                         " now() - interval '20 minutes') RETURNING id", (lost_for,))

    report = verify.verify(pg, settings)
    assert not report.ok
    subjects = {kind: [v.subject for v in report.of(kind)] for kind in verify.KINDS}
    assert subjects == {
        "outcome_count": [f"trigger {fanout}", f"trigger {direct}"],
        "duplicate_outcome": [f"trigger {fanout} / user 2"],
        "over_limit": ["user 9"],
        "undigested": ["user 11"],
        "expired_claim": [f"trigger {orphan}"],
        "missing_delivery": [f"notification {lost_for} / user 4"],
        "expired_delivery_claim": [f"delivery {dead}"],
        "overdue_delivery": [f"delivery {overdue}"],
    }, report.describe()
    details = [v.detail for v in report.of("outcome_count")]
    assert "1 too many" in details[0] and "1 lost" in details[1]  # the duplicate is one outcome too many

    done = herald_verify(db_url, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    parsed = json.loads(done.stdout)
    assert parsed["ok"] is False and parsed["counts"]["over_limit"] == 1
    text = herald_verify(db_url).stdout
    for subject in ("user 9", "user 11", f"trigger {orphan}", f"trigger {fanout} / user 2", f"delivery {dead}"):
        assert subject in text


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def test_a_lost_recipient_is_named(pg, healthy, settings):
    fanout = healthy["fanout"]
    pg.execute("DELETE FROM notifications WHERE trigger_id = %s AND user_id = 5", (fanout,))
    (violation,) = verify.verify(pg, settings).violations
    assert violation.subject == f"trigger {fanout}" and "1 lost" in violation.detail


def test_since_accepts_durations_and_timestamps():
    assert verify.parse_since("2026-11-20T10:00:00").isoformat() == "2026-11-20T10:00:00+00:00"
    with pytest.raises(Exception, match="not a duration"):
        verify.parse_since("yesterday")
