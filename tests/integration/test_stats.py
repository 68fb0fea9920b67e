"""herald.stats against a real PostgreSQL and Redis: exact figures for seeded rows.

Rows are written with plain SQL (not through the pipeline), with times relative to the database's
``now()``, so each expected number is known in advance.
"""

from __future__ import annotations

import argparse
import json
import socket

import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb

from herald import stats
from herald.config import Settings


def add_trigger(
    pg: psycopg.Connection,
    *,
    status: str = "pending",
    priority: str = "normal",
    age: str = "1 minute",
    trigger_type: str = "price_drop",
    claimed_by: str | None = None,
    claim_expires_in: str | None = None,
    processed_ago: str | None = None,
    last_error: str | None = None,
    payload: dict | None = None,
) -> int:
    row = pg.execute(
        """
        INSERT INTO notification_triggers
            (trigger_type, entity_type, entity_id, priority, payload, status, created_at, processed_at,
             last_error, claimed_by, claimed_at, claim_expires_at, attempts)
        VALUES (%(trigger_type)s, 'item', 1, %(priority)s, %(payload)s, %(status)s,
                now() - %(age)s::interval,
                now() - %(processed_ago)s::interval,
                %(last_error)s, %(claimed_by)s,
                CASE WHEN %(claimed_by)s::text IS NULL THEN NULL ELSE now() END,
                now() + %(claim_expires_in)s::interval,
                CASE WHEN %(claimed_by)s::text IS NULL THEN 0 ELSE 1 END)
        RETURNING id
        """,
        {
            "trigger_type": trigger_type,
            "priority": priority,
            "payload": Jsonb(payload or {"item_name": "Lamp", "old_price": 10, "new_price": 8}),
            "status": status,
            "age": age,
            "processed_ago": processed_ago,
            "last_error": last_error,
            "claimed_by": claimed_by,
            "claim_expires_in": claim_expires_in,
        },
    ).fetchone()
    return row[0]


def add_run(
    pg: psycopg.Connection,
    run_id: str,
    *,
    started_ago: str,
    finished_ago: str | None,
    counts: dict,
    dry_run: bool = False,
    triggers: int = 0,
) -> None:
    pg.execute(
        """
        INSERT INTO herald_runs
            (run_id, mode, dry_run, started_at, finished_at, triggers, counts, duration_seconds)
        VALUES (%(run_id)s, 'scheduled', %(dry_run)s, now() - %(started_ago)s::interval,
                now() - %(finished_ago)s::interval, %(triggers)s, %(counts)s,
                extract(epoch FROM %(started_ago)s::interval - %(finished_ago)s::interval))
        """,
        {
            "run_id": run_id,
            "dry_run": dry_run,
            "started_ago": started_ago,
            "finished_ago": finished_ago,
            "triggers": triggers,
            "counts": Jsonb(counts),
        },
    )


def run_counts(delivered=0, skipped=0, limited=0, digested=0, failed=0, done=0, tfailed=0, **extra) -> dict:
    return {
        "delivered": delivered,
        "skipped_preference": skipped,
        "rate_limited": limited,
        "digested": digested,
        "failed": failed,
        "triggers_done": done,
        "triggers_failed": tfailed,
        **extra,
    }


@pytest.fixture
def closed_port_redis() -> redis.Redis:
    """A client for a port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)


def test_empty_database(pg, settings):
    result = stats.queue_stats(pg, None, settings)
    assert result["backlog"] == {"normal": 0, "urgent": 0, "total": 0}
    assert result["oldest_pending_age_seconds"] == {"normal": None, "urgent": None}
    assert result["claims"] == {"held": 0, "expired": 0}
    assert result["throughput"]["last_hour"]["triggers_processed"] == 0
    assert result["throughput"]["last_24h"]["notifications_delivered"] == 0
    assert result["outcomes_last_hour"] == dict.fromkeys(stats.OUTCOME_KINDS, 0)
    assert result["recent_runs"] == []
    assert result["cache"] == {"available": False, "hits": None, "misses": None, "hit_ratio": None}
    assert len(result["series"]["points"]) == stats.SERIES_BUCKETS
    assert all(p["runs"] == 0 and p["delivered"] == 0 for p in result["series"]["points"])
    assert result["series"]["points"][-1]["backlog"] == 0
    assert result["deliveries"]["failures"] == []
    assert set(result["deliveries"]["channels"]) == {"email", "webhook", "apprise"}
    assert all(c["pending"] == 0 and c["oldest_pending_age_seconds"] is None
               for c in result["deliveries"]["channels"].values())
    json.dumps(result)  # JSON-able as it is


def test_deliveries_by_channel_and_status_oldest_pending_and_failure_reasons(pg, settings):
    pg.execute(
        """
        INSERT INTO notification_deliveries
            (notification_id, user_id, channel, address, status, attempts, next_attempt_at, last_error,
             created_at, updated_at)
        VALUES (1, 1, 'email', 'a@x.test', 'pending', 0, now(), NULL, now() - interval '10 minutes', now()),
               (2, 1, 'email', 'a@x.test', 'pending', 2, now() + interval '1 minute',
                'SMTP connection failed: ConnectionRefusedError', now() - interval '3 minutes', now()),
               (3, 1, 'email', 'a@x.test', 'sent', 1, now(), NULL, now(), now()),
               (4, 2, 'webhook', 'https://h.test/2', 'failed', 1, now(), 'HTTP 404 Not Found', now(), now()),
               (5, 2, 'webhook', 'https://h.test/2', 'failed', 1, now(), 'HTTP 404 Not Found', now(), now()),
               (6, 3, 'webhook', 'https://h.test/3', 'disabled', 1, now(), 'HTTP 410 Gone: endpoint disabled',
                now(), now()),
               (7, 4, 'apprise', 'json://h.test', 'sent', 1, now(), NULL, now() - interval '2 days',
                now() - interval '2 days')
        """
    )
    d = stats.queue_stats(pg, None, settings)["deliveries"]
    email, webhook, apprise = d["channels"]["email"], d["channels"]["webhook"], d["channels"]["apprise"]
    assert (email["pending"], email["due"], email["retrying"]) == (2, 1, 1)
    assert 599 <= email["oldest_pending_age_seconds"] < 700
    assert email["last_24h"] == {"pending": 2, "sent": 1, "failed": 0, "disabled": 0}
    assert webhook["last_24h"] == {"pending": 0, "sent": 0, "failed": 2, "disabled": 1}
    assert apprise["last_24h"]["sent"] == 0  # two days old: outside the window
    assert [(f["channel"], f["status"], f["reason"], f["count"]) for f in d["failures"]] == [
        ("webhook", "failed", "HTTP 404 Not Found", 2), ("webhook", "disabled", "HTTP 410 Gone: endpoint disabled", 1)]
    text = stats.render(stats.queue_stats(pg, None, settings))
    assert "channel deliveries" in text and "HTTP 404 Not Found" in text
    assert "a@x.test" not in json.dumps(d) and "h.test" not in text  # reasons and counts, no addresses


def test_backlog_ages_and_claims(pg, settings):
    for _ in range(4):
        add_trigger(pg, priority="normal", age="2 minutes")
    add_trigger(pg, priority="normal", age="600 seconds")  # the oldest normal one
    add_trigger(pg, priority="urgent", age="90 seconds")
    add_trigger(pg, priority="urgent", age="30 seconds")
    # claimed and unexpired (held), claimed and expired: still pending, so in the backlog
    add_trigger(pg, priority="normal", age="1 minute", claimed_by="run-a", claim_expires_in="10 minutes")
    add_trigger(pg, priority="urgent", age="1 minute", claimed_by="run-a", claim_expires_in="10 minutes")
    add_trigger(pg, priority="normal", age="1 minute", claimed_by="run-dead", claim_expires_in="-5 minutes")
    # finished triggers, old and new, claimed or not, are not in the backlog and hold no claim
    add_trigger(
        pg,
        status="done",
        priority="normal",
        age="3 hours",
        processed_ago="2 hours",
        claimed_by="run-old",
        claim_expires_in="-1 hour",
    )
    add_trigger(
        pg,
        status="failed",
        priority="urgent",
        age="2 days",
        processed_ago="1 day",
        last_error="unknown trigger type",
    )

    result = stats.queue_stats(pg, None, settings)

    assert result["backlog"] == {"normal": 7, "urgent": 3, "total": 10}
    assert result["oldest_pending_age_seconds"]["normal"] == pytest.approx(600, abs=5)
    assert result["oldest_pending_age_seconds"]["urgent"] == pytest.approx(90, abs=5)
    assert result["claims"] == {"held": 2, "expired": 1}
    assert result["series"]["points"][-1]["backlog"] == 10


def test_throughput_and_outcomes_from_runs(pg, settings):
    # finished in the last hour
    add_run(
        pg,
        "r1",
        started_ago="50 minutes",
        finished_ago="49 minutes",
        counts=run_counts(delivered=100, skipped=3, limited=2, digested=1, failed=1, done=30, tfailed=2),
    )
    add_run(
        pg,
        "r2",
        started_ago="10 minutes",
        finished_ago="9 minutes",
        counts=run_counts(delivered=20, skipped=1, done=5, digests_sent=2),
    )
    # finished 3 hours ago: in the 24 h window only
    add_run(
        pg,
        "r3",
        started_ago="3 hours 1 minute",
        finished_ago="3 hours",
        counts=run_counts(delivered=1000, limited=50, done=200, tfailed=7),
    )
    # started before the last hour, finished inside it: counted by when it finished
    add_run(
        pg, "r4", started_ago="70 minutes", finished_ago="30 minutes", counts=run_counts(delivered=5, done=1)
    )
    # a dry run and a run older than 24 h count nowhere
    add_run(
        pg,
        "dry",
        started_ago="5 minutes",
        finished_ago="4 minutes",
        dry_run=True,
        counts=run_counts(delivered=999, done=999),
    )
    add_run(
        pg, "old", started_ago="30 hours", finished_ago="29 hours", counts=run_counts(delivered=777, done=77)
    )
    # a run still going: no counts yet
    add_run(pg, "running", started_ago="1 minute", finished_ago=None, counts={})

    result = stats.queue_stats(pg, None, settings)

    assert result["outcomes_last_hour"] == {
        "delivered": 125,
        "skipped_preference": 4,
        "rate_limited": 2,
        "digested": 1,
        "failed": 1,
    }
    assert result["throughput"]["last_hour"] == {
        "triggers_processed": 38,
        "triggers_done": 36,
        "triggers_failed": 2,
        "notifications_delivered": 125,
        "digests_sent": 2,
    }
    assert result["throughput"]["last_24h"] == {
        "triggers_processed": 245,
        "triggers_done": 236,
        "triggers_failed": 9,
        "notifications_delivered": 1125,
        "digests_sent": 2,
    }

    runs = result["recent_runs"]
    assert [r["run_id"] for r in runs] == ["running", "dry", "r2", "r1", "r4", "r3", "old"]
    assert runs[0]["running"] is True and runs[0]["duration_seconds"] is None
    r1 = next(r for r in runs if r["run_id"] == "r1")
    assert r1["duration_seconds"] == pytest.approx(60)
    assert r1["counts"]["delivered"] == 100
    assert next(r for r in runs if r["run_id"] == "dry")["dry_run"] is True

    points = result["series"]["points"]
    assert len(points) == 24
    assert sum(p["delivered"] for p in points) == 1125
    assert sum(p["triggers_processed"] for p in points) == 245
    assert sum(p["runs"] for p in points) == 4
    # the run that finished 3 hours ago sits in a bucket by itself, 3 (or 4, at an hour's edge) back
    assert any(p["delivered"] == 1000 for p in points[-5:-2])


def test_recent_runs_are_the_last_ten(pg, settings):
    for i in range(12):
        add_run(
            pg,
            f"run-{i:02d}",
            started_ago=f"{(12 - i) * 2} minutes",
            finished_ago=f"{(12 - i) * 2 - 1} minutes",
            counts=run_counts(delivered=i),
        )
    runs = stats.queue_stats(pg, None, settings)["recent_runs"]
    assert [r["run_id"] for r in runs] == [f"run-{i:02d}" for i in range(11, 1, -1)]


def test_series_backlog_recorded_by_runs(pg, settings):
    add_run(
        pg,
        "a",
        started_ago="2 hours 10 minutes",
        finished_ago="2 hours 5 minutes",
        counts=run_counts(done=1, backlog=40),
    )
    add_run(
        pg,
        "b",
        started_ago="2 hours 3 minutes",
        finished_ago="2 hours 1 minute",
        counts=run_counts(done=1, backlog=35),
    )
    add_trigger(pg, priority="urgent")
    points = stats.queue_stats(pg, None, settings)["series"]["points"]
    recorded = [p["backlog"] for p in points[:-1] if p["backlog"] is not None]
    # both runs finished in the same hour (or in two, at an hour's edge): the later value wins
    assert recorded in ([35], [40, 35])
    assert points[-1]["backlog"] == 1


def test_cache_hit_ratio_from_redis_counters(pg, settings, redis_client):
    redis_client.set(f"{settings.cache_namespace}:stats:cache_hits", 30)
    redis_client.set(f"{settings.cache_namespace}:stats:cache_misses", 10)
    # another namespace's counters are not ours
    other = Settings(cache_namespace=settings.cache_namespace + "-other")
    redis_client.set(f"{other.cache_namespace}:stats:cache_hits", 1)
    try:
        cache = stats.queue_stats(pg, redis_client, settings)["cache"]
        assert cache == {"available": True, "hits": 30, "misses": 10, "hit_ratio": 0.75}
        assert stats.queue_stats(pg, redis_client, other)["cache"] == {
            "available": True,
            "hits": 1,
            "misses": 0,
            "hit_ratio": 1.0,
        }
    finally:
        redis_client.delete(f"{other.cache_namespace}:stats:cache_hits")


def test_cache_without_data(pg, settings, redis_client):
    cache = stats.queue_stats(pg, redis_client, settings)["cache"]
    assert cache == {"available": True, "hits": 0, "misses": 0, "hit_ratio": None}


def test_redis_down_does_not_break_stats(pg, settings, closed_port_redis):
    add_trigger(pg, priority="urgent")
    result = stats.queue_stats(pg, closed_port_redis, settings)
    assert result["cache"] == {"available": False, "hits": None, "misses": None, "hit_ratio": None}
    assert result["backlog"]["urgent"] == 1


def test_failed_triggers_list_reasons_without_payload(pg):
    add_trigger(
        pg,
        status="failed",
        age="3 hours",
        processed_ago="2 hours",
        trigger_type="nope",
        last_error="unknown trigger type 'nope'",
    )
    newest = add_trigger(
        pg,
        status="failed",
        priority="urgent",
        age="1 hour",
        processed_ago="59 minutes",
        last_error="payload misses 'item_name'",
        payload={"secret": "do not show"},
        claimed_by="run-7",
        claim_expires_in="-1 minute",
    )
    add_trigger(pg, status="done", age="1 hour", processed_ago="1 hour")
    add_trigger(pg, status="pending")

    rows = stats.failed_triggers(pg, 10)
    assert [r["last_error"] for r in rows] == ["payload misses 'item_name'", "unknown trigger type 'nope'"]
    assert rows[0]["id"] == newest
    assert rows[0]["priority"] == "urgent" and rows[0]["run_id"] == "run-7" and rows[0]["attempts"] == 1
    assert set(rows[0]) == {
        "id",
        "trigger_type",
        "priority",
        "created_at",
        "processed_at",
        "attempts",
        "run_id",
        "last_error",
    }
    assert "do not show" not in json.dumps(rows)
    assert len(stats.failed_triggers(pg, 1)) == 1
    for bad in (0, 501):
        with pytest.raises(ValueError):
            stats.failed_triggers(pg, bad)


def test_non_autocommit_connection_is_left_idle(db_url, pg, settings):
    """The plugin's PostgresHook connection is not in autocommit: no transaction stays open."""
    add_trigger(pg)
    with psycopg.connect(db_url) as conn:
        assert stats.queue_stats(conn, None, settings)["backlog"]["total"] == 1
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_stats_sql_uses_the_indexes(pg):
    """On big tables, every stats query goes through the index 0002 made for it: no sequential scan."""
    pg.execute(
        """
        INSERT INTO notification_triggers
            (trigger_type, entity_type, entity_id, status, created_at, processed_at)
        SELECT 'price_drop', 'item', g, CASE WHEN mod(g, 100) = 0 THEN 'failed' ELSE 'done' END,
               now() - make_interval(secs => g), now()
        FROM generate_series(1, 200000) AS g
        """
    )
    for _ in range(20):
        add_trigger(pg)
    # a month of runs every two minutes (30-day retention)
    pg.execute(
        """
        INSERT INTO herald_runs (run_id, started_at, finished_at, counts)
        SELECT 'run-' || g,
               now() - make_interval(secs => g * 120),
               now() - make_interval(secs => g * 120 - 30),
               '{"delivered": 5, "triggers_done": 2}'
        FROM generate_series(1, 21600) AS g
        """
    )
    pg.execute("ANALYZE notification_triggers")
    pg.execute("ANALYZE herald_runs")

    def plan(name, params):
        text = "\n".join(r[0] for r in pg.execute("EXPLAIN " + stats.db.sql(name), params).fetchall())
        assert "Seq Scan" not in text, text
        return text

    windows = {"max_run_seconds": stats.MAX_RUN_SECONDS}
    assert "notification_triggers_pending_idx" in plan("stats_pending_backlog", {})
    assert "notification_triggers_failed_idx" in plan("stats_failed_triggers", {"limit": 50})
    assert "herald_runs_started_idx" in plan("stats_recent_runs", {"limit": 10})
    assert "herald_runs_started_idx" in plan(
        "stats_run_totals", {"short_window_seconds": 3600, "long_window_seconds": 86400, **windows}
    )
    assert "herald_runs_started_idx" in plan(
        "stats_throughput_series", {"bucket_seconds": 3600, "buckets": 24, **windows}
    )


def test_cli_json_and_table(db_url, pg, settings, redis_url, monkeypatch, capsys):
    add_trigger(pg, priority="urgent", age="5 minutes")
    add_run(
        pg,
        "cli-run",
        started_ago="3 minutes",
        finished_ago="2 minutes",
        counts=run_counts(delivered=42, done=3),
    )
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("HERALD_CACHE_NAMESPACE", settings.cache_namespace)

    assert stats.main(argparse.Namespace(json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backlog"] == {"normal": 0, "urgent": 1, "total": 1}
    assert data["throughput"]["last_hour"]["notifications_delivered"] == 42

    assert stats.main(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "pending triggers" in out and "cli-run" in out and "42" in out


def test_urgent_latency_of_the_last_hour(pg, settings):
    """INSERT to processing of the urgent triggers processed in the last hour: median and 95th percentile."""
    pg.execute(
        """
        INSERT INTO notification_triggers (trigger_type, user_id, priority, status, created_at, processed_at)
        SELECT 'security_alert', 1, p, s, now() - interval '10 minutes' - make_interval(secs => d),
               now() - interval '10 minutes'
        FROM (VALUES ('urgent', 'done', 1), ('urgent', 'done', 2), ('urgent', 'done', 3), ('urgent', 'done', 4),
                     ('normal', 'done', 100), ('urgent', 'failed', 100)) AS v(p, s, d)
        """)
    pg.execute("INSERT INTO notification_triggers (trigger_type, user_id, priority, status, created_at, processed_at)"
               " VALUES ('security_alert', 1, 'urgent', 'done', now() - interval '3 hours',"
               " now() - interval '2 hours')")  # outside the hour
    lane = stats.queue_stats(pg, None, settings)["urgent_latency_last_hour"]
    assert lane == {"triggers": 4, "p50_seconds": 2.5, "p95_seconds": 3.85}
    assert "p50 2.5 s, p95 3.9 s over 4 urgent triggers" in stats.render(stats.queue_stats(pg, None, settings))
