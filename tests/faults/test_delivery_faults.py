"""Fault cases of the channels: send tasks in processes of their own, real SMTP and HTTP receivers.

Each case ends with :func:`settle` and what the receivers saw: every delivery recorded once (``sent``,
``failed`` with a reason, or ``disabled``), every ``sent`` one seen by its receiver, none under two ids.
A send whose recording was lost is sent again under the same idempotency id: that is at least once,
and the row says how many were resent.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

from herald import channels, pipeline
from herald.channels.smtp_sink import SmtpSink
from herald.claiming import ClaimRequest
from tests import factories as f
from tests.faults.conftest import settle
from tests.receivers import SECRET, WebhookReceiver


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def channel_env(faults, sink: SmtpSink | None, backoff: int = 1) -> dict[str, str]:
    env = faults.env(delivery_backoff_seconds=backoff)
    if sink is not None:
        env["AIRFLOW_CONN_NOTIFICATIONS_SMTP"] = sink.connection_uri()
    env["AIRFLOW_CONN_NOTIFICATIONS_WEBHOOK"] = f'{{"conn_type": "generic", "password": "{SECRET}"}}'
    return env


def notify(pg, redis_client, settings, users: range, claim_id: str) -> None:
    """A fan-out trigger to these users, processed: their notifications and deliveries are written."""
    f.add_users(pg, users)
    f.add_favorites(pg, users, "item", 1)
    f.add_trigger(pg, "price_drop", entity=("item", 1))
    pipeline.run_once(pg, redis_client, settings, ClaimRequest(claim_id))


def seen_ids(sink: SmtpSink | None = None, receiver: WebhookReceiver | None = None) -> dict[int, list[str]]:
    """Per delivery id, the idempotency ids its receiver saw (one per message received)."""
    seen: dict[int, list[str]] = defaultdict(list)
    for m in sink.messages if sink else []:
        seen[int(m.delivery_id)].append(m.message_id)
    for r in receiver.requests if receiver else []:
        if r.status < 300:
            seen[r.json()["data"]["delivery_id"]].append(r.webhook_id)
    return seen


def test_send_task_sigkilled_after_sending_before_recording(pg, faults, settings, redis_client):
    with WebhookReceiver() as receiver, SmtpSink() as sink:
        users = range(1, 41)
        notify(pg, redis_client, settings, users, "run-1")
        pg.execute("INSERT INTO user_channels (user_id, channel, address)"
                   " SELECT g, 'webhook', %s FROM generate_series(1, 20) g", (receiver.url("/hook"),))
        pg.execute("INSERT INTO user_channels (user_id, channel, address)"
                   " SELECT g, 'email', 'user' || g || '@example.test' FROM generate_series(21, 40) g")
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "Lamp"})
        pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-2"))
        assert scalar(pg, "SELECT count(*) FROM notification_deliveries") == 40
        summary = channels.claim(pg, "deliver-1", settings)
        env = channel_env(faults, sink)
        for batch in summary.batches:  # each send task is killed once, after sending, before recording
            victim = faults.worker("deliver", "deliver-1", str(batch.batch), "--channel", batch.channel,
                                   pause_at="after_send", env=env)
            victim.wait_reached()
            victim.kill()
        assert scalar(pg, "SELECT count(*) FROM notification_deliveries WHERE status = 'pending'") == 40
        assert len(receiver.requests) == 20 and len(sink.messages) == 20  # sent, not recorded
        for batch in summary.batches:  # the tasks' retries, in new processes
            retry = faults.worker("deliver", "deliver-1", str(batch.batch), "--channel", batch.channel,
                                  env=env).result()
            assert (retry["sent"], retry["deliveries"]) == (20, 20)
        assert dict(pg.execute("SELECT status, attempts FROM notification_deliveries"
                               " GROUP BY 1, 2").fetchall()) == {"sent": 2}
        seen = seen_ids(sink, receiver)
        assert len(seen) == 40 and all(len(ids) == 2 and ids[0] == ids[1] for ids in seen.values()), seen
        assert all(r.signature_ok for r in receiver.requests)
        recorded = dict(pg.execute("SELECT id, provider_message_id FROM notification_deliveries").fetchall())
        assert all(recorded[i] == ids[0] for i, ids in seen.items())
        settle(pg, settings, "send task SIGKILLed after sending, before recording",
               "SIGKILL of each send process (webhook, email) after its chunk went out and before its answers "
               "were recorded; then the task's retry in a new process: every message sent again with the same "
               "webhook-id / Message-ID", seen=seen)


def test_smtp_down_for_a_while_then_back(pg, faults, settings, redis_client):
    sink = SmtpSink()  # its port, with nothing listening yet: the SMTP server is down
    users = range(1, 251)
    pg.execute("INSERT INTO user_channels (user_id, channel, address)"
               " SELECT g, 'email', 'user' || g || '@example.test' FROM generate_series(1, 250) g")
    notify(pg, redis_client, settings, users, "run-1")
    assert scalar(pg, "SELECT count(*) FROM notification_deliveries") == 250
    env = channel_env(faults, sink, backoff=1)
    for n in range(2):  # two runs while it is down: each tries one connection, loses nothing
        down = faults.worker("deliveries", f"deliver-down-{n}", env=env).result()
        assert down["sent"] == 0 and down["deliveries"] + down["released"] == 250, down
        time.sleep(1.1)  # the first chunk's backoff (1 s base, jitter) has run out
    pending = dict(pg.execute("SELECT attempts, count(*) FROM notification_deliveries"
                              " WHERE status = 'pending' GROUP BY 1").fetchall())
    assert sum(pending.values()) == 250 and max(pending) <= 2  # waiting, nothing failed or lost
    assert scalar(pg, "SELECT count(*) FROM notification_deliveries"
                      " WHERE last_error LIKE 'SMTP connection failed%%'") > 0
    sink.start()  # the server is back
    runs = []
    try:
        deadline = time.monotonic() + 60
        while scalar(pg, "SELECT count(*) FROM notification_deliveries WHERE status = 'pending'"):
            assert time.monotonic() < deadline, "deliveries still pending a minute after SMTP came back"
            runs.append(faults.worker("deliveries", f"deliver-up-{len(runs)}", env=env).result())
            time.sleep(0.5)
    finally:
        sink.stop()
    assert scalar(pg, "SELECT count(*) FROM notification_deliveries WHERE status = 'sent'") == 250
    assert sorted(int(m.delivery_id) for m in sink.messages) == sorted(
        r[0] for r in pg.execute("SELECT id FROM notification_deliveries").fetchall())
    assert sink.sessions == sum(r["batches"] for r in runs)  # one SMTP connection per send task
    assert sum(r["sent"] for r in runs) == 250
    settle(pg, dataclasses.replace(settings), "SMTP server down for a while, then back",
           "250 email deliveries while nothing listens on the SMTP port (two delivery runs, each stopping "
           "at its first refused connection), then the server starts", seen=seen_ids(sink))
