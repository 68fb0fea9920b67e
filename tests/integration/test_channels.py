"""Channels end to end against real receivers: an ``aiosmtpd`` SMTP server and an HTTP server that checks
Standard Webhooks signatures (``tests/receivers.py``), both on 127.0.0.1, started and stopped here.

The senders are herald's own (``herald.airflow_tasks.sender_for``): email through the SMTP provider's
hook with the ``notifications_smtp`` connection, webhooks signed with the ``notifications_webhook``
connection's secret, both given as ``AIRFLOW_CONN_*`` variables as a deployment would.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from herald import channels, pipeline, verify
from herald.airflow_tasks import sender_for
from herald.channels.smtp_sink import SmtpSink
from herald.claiming import ClaimRequest
from herald.config import Settings
from herald.processing import process_batch
from tests import factories as f
from tests.receivers import SECRET, WebhookReceiver

WEBHOOK_CONN = f'{{"conn_type": "generic", "password": "{SECRET}"}}'


@pytest.fixture
def sink(monkeypatch) -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_SMTP", server.connection_uri())
        yield server


@pytest.fixture
def receiver(monkeypatch) -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        monkeypatch.setenv("AIRFLOW_CONN_NOTIFICATIONS_WEBHOOK", WEBHOOK_CONN)
        yield server


@pytest.fixture
def fast(settings) -> Settings:
    """Settings whose first retry waits about a second."""
    return dataclasses.replace(settings, delivery_backoff_seconds=1)


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def add_channel(pg, user_id: int, channel: str, address: str, enabled: bool = True) -> None:
    pg.execute("INSERT INTO user_channels (user_id, channel, address, enabled) VALUES (%s, %s, %s, %s)",
               (user_id, channel, address, enabled))


def deliver_run(pg, settings: Settings, claim_id: str, **claim_args) -> dict[str, int]:
    """One notification_delivery run in this process: claim, send every batch, release."""
    summary = channels.claim(pg, claim_id, settings, **claim_args)
    totals = dict.fromkeys(("batches", "sent", "retried", "failed", "disabled"), 0)
    totals["batches"] = len(summary.batches)
    for batch in summary.batches:
        result = channels.deliver_batch(pg, batch, sender_for(batch.channel, settings), settings)
        for key in ("sent", "retried", "failed", "disabled"):
            totals[key] += getattr(result, key)
    channels.release(pg, claim_id)
    return totals


def deliver_until_settled(pg, settings: Settings, timeout: float = 30) -> list[dict[str, int]]:
    """Delivery runs until nothing is pending (waiting for retries to come due)."""
    runs: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout
    while scalar(pg, "SELECT count(*) FROM notification_deliveries WHERE status = 'pending'"):
        assert time.monotonic() < deadline, "deliveries still pending"
        runs.append(deliver_run(pg, settings, f"deliver-{len(runs)}"))
        time.sleep(0.2)
    return runs


def deliveries(pg) -> list[dict]:
    cur = pg.execute("SELECT * FROM notification_deliveries ORDER BY id")
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_fanout_to_email_webhook_and_apprise_delivers_every_message_once(pg, redis_client, settings, sink,
                                                                          receiver):
    users = range(1, 31)
    f.add_users(pg, users)
    f.add_favorites(pg, users, "item", 1)
    for u in range(1, 11):
        add_channel(pg, u, "email", f"user{u}@example.test")
    for u in range(11, 21):
        add_channel(pg, u, "webhook", receiver.url(f"/hooks/{u}"))
    add_channel(pg, 5, "webhook", receiver.url("/hooks/5"))  # two channels
    for u in range(21, 24):
        add_channel(pg, u, "apprise", f"json://127.0.0.1:{receiver.port}/apprise/{u}")
    add_channel(pg, 24, "sms", "+100000024")  # a channel herald does not know: ignored
    add_channel(pg, 25, "email", "off@example.test", enabled=False)
    fanout = f.add_trigger(pg, "price_drop", entity=("item", 1), payload={
        "item_name": "Lamp <b>", "old_price": "40", "new_price": "30"})
    urgent = f.add_trigger(pg, "security_alert", user_id=12, priority="urgent", payload={"message": "New login"})
    summary, _ = pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    assert summary.counts["delivered"] == 31 and summary.counts["deliveries"] == 25

    claim = channels.claim(pg, "deliver-1", settings)
    assert [(b.priority, b.channel, b.deliveries) for b in claim.batches] == [
        ("urgent", "webhook", 1), ("normal", "apprise", 3), ("normal", "email", 10), ("normal", "webhook", 11)]
    assert claim.by_lane()["urgent"][0]["batch"] == 0  # urgent first, in its own lane
    channels.release(pg, "deliver-1")
    runs = deliver_until_settled(pg, settings)
    assert len(runs) == 1 and runs[0]["sent"] == 25

    # The SMTP server saw exactly one message per email delivery, with the delivery's Message-ID.
    rows = deliveries(pg)
    emails = {r["id"]: r for r in rows if r["channel"] == "email"}
    assert sorted(m.rcpt_tos for m in sink.messages) == sorted((f"user{u}@example.test",) for u in range(1, 11))
    assert {int(m.delivery_id): m.message_id for m in sink.messages} == {
        i: f"<herald-delivery-{i}@example.test>" for i in emails}
    assert {m.subject for m in sink.messages} == {"Price drop: Lamp <b>"}
    # The HTTP receiver saw one signed POST per webhook delivery; every signature verifies.
    posts = [r for r in receiver.requests if r.path.startswith("/hooks/")]
    assert sorted(r.path for r in posts) == sorted([f"/hooks/{u}" for u in range(11, 21)] + ["/hooks/5", "/hooks/12"])
    assert len(posts) == 12 and all(r.signature_ok for r in posts)
    assert len({r.webhook_id for r in posts}) == 12
    urgent_post = next(r for r in posts if r.json()["data"]["trigger_id"] == urgent)
    assert urgent_post.path == "/hooks/12" and urgent_post.json()["data"]["priority"] == "urgent"
    assert urgent_post.json()["type"] == "notification.security_alert"
    fanout_post = next(r for r in posts if r.path == "/hooks/5")
    assert fanout_post.json()["data"]["title"] == "Price drop: Lamp <b>"
    assert fanout_post.json()["data"]["trigger_id"] == fanout
    # Apprise targets (its json:// plugin, to the same local server) got one message each.
    apprise_posts = [r for r in receiver.requests if r.path.startswith("/apprise/")]
    assert sorted(r.path for r in apprise_posts) == [f"/apprise/{u}" for u in range(21, 24)]
    assert {r.json()["title"] for r in apprise_posts} == {"Price drop: Lamp <b>"}
    # The books: every delivery sent once, at the first attempt, with the id the receiver saw.
    assert {(r["status"], r["attempts"]) for r in rows} == {("sent", 1)}
    hooks = {r.webhook_id for r in posts}
    assert {r["provider_message_id"] for r in rows if r["channel"] == "webhook"} == hooks
    assert all(r["claimed_by"] is None and r["sent_at"] is not None for r in rows)
    assert verify.verify(pg, settings).ok
    # A second run finds nothing to send.
    assert deliver_run(pg, settings, "deliver-again")["batches"] == 0
    assert len(sink.messages) == 10 and len(receiver.requests) == 15


def test_receiver_answering_503_twice_gets_the_same_webhook_id_three_times(pg, redis_client, fast, receiver):
    f.add_users(pg, [1])
    add_channel(pg, 1, "webhook", receiver.url("/flaky"))
    receiver.script("/flaky", (503, {"Retry-After": "2"}), 503, 200)
    f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "Lamp"})
    pipeline.run_once(pg, redis_client, fast, ClaimRequest("run-1"))

    first = deliver_run(pg, fast, "deliver-first")
    assert first["retried"] == 1
    (row,) = deliveries(pg)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "HTTP 503 Service Unavailable")
    waits = scalar(pg, "SELECT extract(epoch FROM next_attempt_at - updated_at) FROM notification_deliveries")
    assert 1.9 <= waits <= 2.1  # Retry-After: 2 wins over the 0.5 to 1 s backoff
    assert deliver_run(pg, fast, "too-early")["batches"] == 0  # not due yet

    deliver_until_settled(pg, fast)
    (row,) = deliveries(pg)
    assert (row["status"], row["attempts"]) == ("sent", 3)
    tries = receiver.to("/flaky")
    assert [r.status for r in tries] == [503, 503, 200]
    assert len({r.webhook_id for r in tries}) == 1 == len({r.body for r in tries})
    assert row["provider_message_id"] == tries[0].webhook_id == f"herald-delivery-{row['id']}"
    assert len({r.headers["webhook-timestamp"] for r in tries}) >= 2 and all(r.signature_ok for r in tries)
    assert tries[1].at - tries[0].at >= 1.9


def test_410_disables_the_endpoint_and_is_not_retried(pg, redis_client, fast, receiver):
    f.add_users(pg, [1, 2])
    add_channel(pg, 1, "webhook", receiver.url("/gone"))
    add_channel(pg, 2, "webhook", receiver.url("/fine"))
    receiver.script("/gone", 410)
    for i in range(2):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"x{i}"})
    f.add_favorites(pg, [1, 2], "item", 1)
    pipeline.run_once(pg, redis_client, fast, ClaimRequest("run-1"))
    assert len(deliveries(pg)) == 4

    deliver_until_settled(pg, fast)
    gone = [r for r in deliveries(pg) if r["user_id"] == 1]
    assert [(r["status"], r["attempts"]) for r in gone] == [("disabled", 1), ("disabled", 1)]
    assert gone[0]["last_error"] == "HTTP 410 Gone: endpoint disabled"
    assert "switched off" in gone[1]["last_error"]
    assert len(receiver.to("/gone")) == 1  # the second was not even tried, and nothing was retried
    assert scalar(pg, "SELECT enabled FROM user_channels WHERE user_id = 1") is False
    assert {r["status"] for r in deliveries(pg) if r["user_id"] == 2} == {"sent"}
    # A later notification makes no delivery for the disabled endpoint.
    f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "later"})
    pipeline.run_once(pg, redis_client, fast, ClaimRequest("run-2"))
    assert scalar(pg, "SELECT count(*) FROM notification_deliveries WHERE user_id = 1") == 2
    assert verify.verify(pg, fast).ok


def test_other_4xx_fail_at_once_5xx_until_the_limit_then_redeliver_failed(pg, redis_client, fast, receiver):
    limited = dataclasses.replace(fast, delivery_max_attempts=2)
    f.add_users(pg, [1, 2])
    add_channel(pg, 1, "webhook", receiver.url("/missing"))
    add_channel(pg, 2, "webhook", receiver.url("/broken"))
    receiver.script("/missing", 404)
    receiver.script("/broken", 500, 502)
    f.add_favorites(pg, [1, 2], "item", 1)
    f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "x"})
    pipeline.run_once(pg, redis_client, limited, ClaimRequest("run-1"))
    deliver_until_settled(pg, limited)
    missing, broken = deliveries(pg)
    assert (missing["status"], missing["attempts"], missing["last_error"]) == ("failed", 1, "HTTP 404 Not Found")
    assert (broken["status"], broken["attempts"]) == ("failed", 2)
    assert broken["last_error"] == "gave up after 2 attempts: HTTP 502 Bad Gateway"
    assert len(receiver.to("/missing")) == 1 and len(receiver.to("/broken")) == 2

    # The operator fixes the receivers and re-drives the failed deliveries (the redeliver_failed param).
    assert deliver_run(pg, limited, "redrive", redeliver_failed=True)["sent"] == 2
    assert [(r["status"], r["attempts"]) for r in deliveries(pg)] == [("sent", 1), ("sent", 1)]
    assert len({r.webhook_id for r in receiver.to("/broken")}) == 1  # the same id as before the redrive


def test_a_user_who_disabled_email_for_price_drop_gets_the_notification_and_no_email(pg, redis_client, settings,
                                                                                     sink, receiver):
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1, 2], "item", 1)
    for u in (1, 2):
        add_channel(pg, u, "email", f"user{u}@example.test")
        add_channel(pg, u, "webhook", receiver.url(f"/u{u}"))
    pg.execute("INSERT INTO user_notification_preferences (user_id, notification_type, channel, enabled)"
               " VALUES (1, 'price_drop', 'email', false)")
    price_drop = f.add_trigger(pg, "price_drop", entity=("item", 1))
    back_in_stock = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "Lamp"})
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))

    assert f.notifications_of(pg, price_drop) == [1, 2]  # in-app for both: an email preference is not in-app
    assert f.notifications_of(pg, back_in_stock) == [1, 2]
    deliver_until_settled(pg, settings)
    emails = sorted((m.rcpt_tos[0], m.subject) for m in sink.messages)
    assert emails == [("user1@example.test", "Back in stock: Lamp"), ("user2@example.test", "Back in stock: Lamp"),
                      ("user2@example.test", "Price drop: Lamp")]
    assert sorted(r.path for r in receiver.requests) == ["/u1", "/u1", "/u2", "/u2"]  # webhooks untouched
    # The channel row is not an in-app preference: nothing skipped, and the Redis cache of in-app
    # preferences holds nothing disabled for user 1.
    assert pg.execute("SELECT count(*) FROM notification_outcomes WHERE outcome = 'skipped_preference'"
                      ).fetchone()[0] == 0
    assert redis_client.get(f"{settings.cache_namespace}:pref:1") == b"u:[]"
    assert verify.verify(pg, settings).ok


def test_an_all_channels_preference_still_disables_the_notification_and_every_delivery(pg, redis_client, settings):
    f.add_users(pg, [1])
    add_channel(pg, 1, "email", "user1@example.test")
    f.disable(pg, 1, "price_drop")  # channel NULL: the application's existing kind of row
    pg.execute("INSERT INTO user_notification_preferences (user_id, notification_type, channel, enabled)"
               " VALUES (1, 'price_drop', 'email', true)")  # coexists: another key
    t = f.add_trigger(pg, "price_drop", user_id=1)
    s = f.add_trigger(pg, "security_alert", user_id=1, priority="urgent", payload={"message": "login"})
    pg.execute("INSERT INTO user_notification_preferences (user_id, notification_type, channel, enabled)"
               " VALUES (1, 'security_alert', 'email', false)")
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    assert f.outcomes_of(pg, t) == {1: "skipped_preference"}
    assert f.outcomes_of(pg, s) == {1: "delivered"}
    # security_alert bypasses preferences, the channel ones included
    assert [(r["channel"], r["priority"]) for r in deliveries(pg)] == [("email", "urgent")]
    with pytest.raises(Exception, match="user_notification_preferences_key"):
        pg.execute("INSERT INTO user_notification_preferences (user_id, notification_type, channel, enabled)"
                   " VALUES (1, 'price_drop', 'email', false)")


def test_notification_and_deliveries_are_written_together_or_not_at_all(pg, redis_client, settings):
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1, 2], "item", 1)
    add_channel(pg, 1, "email", "user1@example.test")
    f.add_trigger(pg, "price_drop", entity=("item", 1))
    from herald import claiming

    (batch,) = claiming.claim(pg, ClaimRequest("run-1"), settings)

    def crash(stage: str) -> None:
        if stage == "after_write":
            raise RuntimeError("crash after the writes, before the commit")

    with pytest.raises(RuntimeError, match="crash after the writes"):
        process_batch(pg, redis_client, batch, settings, checkpoint=crash)
    assert scalar(pg, "SELECT count(*) FROM notifications") == 0
    assert scalar(pg, "SELECT count(*) FROM notification_deliveries") == 0
    result = process_batch(pg, redis_client, batch, settings)  # the task's retry
    assert (result.delivered, result.deliveries) == (2, 1)
    assert process_batch(pg, redis_client, batch, settings).deliveries == 0  # nothing twice
    (row,) = deliveries(pg)
    assert row["notification_id"] == scalar(pg, "SELECT id FROM notifications WHERE user_id = 1")


def test_digests_get_their_deliveries_too(pg, redis_client, settings):
    short = dataclasses.replace(settings, rate_limit=1, rate_window_seconds=1)
    f.add_users(pg, [1])
    add_channel(pg, 1, "email", "user1@example.test")
    for i in range(3):
        f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": f"i{i}"})
    first, _ = pipeline.run_once(pg, redis_client, short, ClaimRequest("run-1"))
    assert (first.counts["delivered"], first.counts["rate_limited"], first.counts["deliveries"]) == (1, 2, 1)
    time.sleep(1.1)
    second, _ = pipeline.run_once(pg, redis_client, short, ClaimRequest("run-2"))
    assert (second.digests, second.counts["deliveries"]) == (1, 1)
    digest = scalar(pg, "SELECT id FROM notifications WHERE notification_type = 'digest'")
    assert [r["notification_id"] for r in deliveries(pg)][-1] == digest


def test_two_runs_never_claim_the_same_delivery_and_poison_ends_failed(pg, redis_client, settings):
    f.add_users(pg, range(1, 21))
    f.add_favorites(pg, range(1, 21), "item", 1)
    pg.execute("INSERT INTO user_channels (user_id, channel, address)"
               " SELECT g, 'email', 'u' || g || '@example.test' FROM generate_series(1, 20) g")
    f.add_trigger(pg, "price_drop", entity=("item", 1))
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    a = channels.claim(pg, "run-a", settings, limit=12)
    b = channels.claim(pg, "run-b", settings)
    assert sum(x.deliveries for x in a.batches) == 12 and sum(x.deliveries for x in b.batches) == 8
    assert channels.claim(pg, "run-a", settings).batches == a.batches  # a retried claim: the same batches
    held = dict(pg.execute("SELECT claimed_by, count(*) FROM notification_deliveries GROUP BY 1").fetchall())
    assert held == {"run-a": 12, "run-b": 8}
    # Deliveries whose sends started max_attempts times without an answer (the sender kept dying):
    pg.execute("UPDATE notification_deliveries SET attempts = %s, claim_expires_at = now() - interval '1 s'"
               " WHERE claimed_by = 'run-b'", (settings.delivery_max_attempts,))
    c = channels.claim(pg, "run-c", settings)
    assert c.exhausted == 8 and c.batches == []
    failed = pg.execute("SELECT DISTINCT last_error FROM notification_deliveries WHERE status = 'failed'").fetchall()
    assert failed == [(f"gave up after {settings.delivery_max_attempts} attempts: its send never finished; "
                       "last error: none",)]
    assert channels.release(pg, "run-a") == 12
