"""``airflow dags test notification_delivery`` as a subprocess, against a real SMTP server and a real
signature-checking HTTP receiver that this test starts (both on 127.0.0.1) and the test database.

The whole DAG (claim, the mapped send tasks of every lane, finalize) runs in one Airflow process with a
SQLite metadata DB; the channels' connections come as ``AIRFLOW_CONN_*`` variables, as in a deployment.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from herald import pipeline, verify
from herald.channels.smtp_sink import SmtpSink
from herald.claiming import ClaimRequest
from herald.config import DELIVERY_DAG_ID
from tests import factories as f
from tests.e2e.airflow_procs import airflow, airflow_env
from tests.receivers import SECRET, WebhookReceiver

pytestmark = pytest.mark.slow


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def test_dags_test_sends_every_delivery_once_through_its_lane(pg, redis_client, settings, db_url, redis_url,
                                                               tmp_path: Path):
    users = range(1, 41)
    f.add_users(pg, users)
    f.add_favorites(pg, users, "item", 1)
    with SmtpSink() as sink, WebhookReceiver() as receiver:
        pg.execute("INSERT INTO user_channels (user_id, channel, address)"
                   " SELECT g, 'email', 'user' || g || '@example.test' FROM generate_series(1, 20) g")
        pg.execute("INSERT INTO user_channels (user_id, channel, address)"
                   " SELECT g, 'webhook', %s || g FROM generate_series(21, 40) g", (receiver.url("/hooks/"),))
        receiver.script("/hooks/22", 500)  # one receiver fails once: retried by a later run, not this one
        f.add_trigger(pg, "price_drop", entity=("item", 1))
        f.add_trigger(pg, "security_alert", user_id=3, priority="urgent", payload={"message": "New login"})
        pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
        assert scalar(pg, "SELECT count(*) FROM notification_deliveries") == 41

        home = tmp_path / "airflow_home"
        env = airflow_env(home, db_url=db_url, redis_url=redis_url, namespace=settings.cache_namespace, extra={
            "AIRFLOW_CONN_NOTIFICATIONS_SMTP": sink.connection_uri(),
            "AIRFLOW_CONN_NOTIFICATIONS_WEBHOOK": json.dumps({"conn_type": "generic", "password": SECRET}),
        })
        airflow("db", "migrate", env=env)
        airflow("dags", "test", DELIVERY_DAG_ID, env=env, timeout=600)

        with sqlite3.connect(home / "airflow.db") as meta:
            tasks = dict(meta.execute(
                "SELECT task_id || ':' || map_index, state FROM task_instance WHERE dag_id = ?",
                (DELIVERY_DAG_ID,)).fetchall())
        assert tasks["send_urgent:0"] == tasks["send_email:0"] == tasks["send_webhook:0"] == "success", tasks
        assert tasks["send_apprise:-1"] == "skipped" and tasks["watcher:-1"] == "skipped", tasks
        assert tasks["finalize:-1"] == "success"

        statuses = dict(pg.execute("SELECT status, count(*) FROM notification_deliveries GROUP BY 1").fetchall())
        assert statuses == {"sent": 40, "pending": 1}, statuses  # /hooks/22 answered 500: waits for its retry
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
            [f"user{u}@example.test" for u in range(1, 21)] + ["user3@example.test"])
        posts = receiver.requests
        assert len(posts) == 20 and all(r.signature_ok for r in posts)
        assert scalar(pg, "SELECT count(*) FROM notification_deliveries WHERE claimed_by IS NOT NULL") == 0
        retry = pg.execute("SELECT attempts, last_error, next_attempt_at > now() FROM notification_deliveries"
                           " WHERE status = 'pending'").fetchone()
        assert retry == (1, "HTTP 500 Internal Server Error", True)
        assert verify.verify(pg, settings).ok
