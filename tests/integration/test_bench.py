"""``herald bench`` end to end at a tiny size: the report's shape and the core/reference agreement.

Not a timed test: the seconds are only checked to be measured (positive), never compared.
"""

from __future__ import annotations

import argparse
import json
import os

import psycopg
import pytest
import redis

from herald import bench, services

REQUIRED_KEYS = (
    "notifications", "copy_floor_seconds", "core_seconds", "reference_seconds", "core_sql_statements",
    "reference_sql_statements", "core_redis_commands", "redis_max_call_ms", "core_us_per_notification",
)


def w1_verify_ok(report: dict) -> bool:
    """herald verify ran after the core run, over real rows, and found every check clean."""
    verified = report["runs"][0]["verify"]["core"]
    return verified["ok"] is True and set(verified["counts"]) >= {"outcome_count", "over_limit"}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def bench_database(found_services: services.Services):
    name = f"herald_bench_test_{os.getpid()}"
    yield name
    services.drop_database(found_services.database_url, name)


def test_bench_end_to_end_small(tmp_path, bench_database, found_services, capsys):
    out = tmp_path / "bench.json"
    client = redis.Redis.from_url(found_services.redis_url)
    slowlog_before = client.config_get("slowlog-log-slower-than")
    client.close()
    status = bench.main(_args("--users", "300", "--triggers", "60", "--scale", "1", "2",
                              "--database", bench_database, "--json", str(out)))
    printed = capsys.readouterr().out
    assert status == 0, printed

    report = json.loads(out.read_text())
    for key in REQUIRED_KEYS:
        assert key in report, key
    assert report["notifications"] > 0
    assert report["core_sql_statements"] > 0
    assert report["reference_sql_statements"] > report["core_sql_statements"]  # per row vs per batch
    assert report["core_redis_commands"] > 0
    assert report["copy_floor_seconds"] > 0 and report["core_seconds"] > 0 and report["reference_seconds"] > 0
    assert report["batch_peak_mb"] > 0 and report["claim_peak_mb"] > 0
    assert report["reference_same_notifications"] is True
    assert w1_verify_ok(report)
    assert report["ok"] is True and report["problems"] == []
    assert {"cores", "python", "postgresql", "redis"} <= set(report["machine"])

    w1, doubled = report["runs"]
    assert (w1["scale"], doubled["scale"]) == (1, 2)
    assert w1["notifications"] == report["notifications"]
    assert doubled["notifications"] > w1["notifications"]
    # The reference runs on scale 1 only by default, and the report says so.
    assert doubled["reference_seconds"] is None and doubled["reference_skipped"]
    # Statements grow with batches, not with users or triggers.
    assert doubled["core_sql_statements"] <= w1["core_sql_statements"] + 10 * doubled["batches"]
    assert {"core_over_copy", "core_sql_statements", "reference_over_core"} <= set(w1["targets"])
    # The longest server-side Redis call is measured (SLOWLOG), and the per-notification cost and peak
    # memory are compared with W1's.
    assert 0 < w1["redis_max_call_ms"] < 1000 and 0 < doubled["redis_max_call_ms"] < 1000
    assert w1["core_per_notification_over_w1"] is None
    assert doubled["core_per_notification_over_w1"] == round(
        doubled["core_us_per_notification"] / w1["core_us_per_notification"], 2)
    assert doubled["batch_peak_mb_over_previous_scale"] > 0 and w1["batch_peak_mb_over_previous_scale"] is None
    assert doubled["copy_per_notification_over_w1"] > 0
    assert doubled["targets"]["redis_max_call_ms"]["met"] is not None
    # The bench restores the server's SLOWLOG settings.
    client = redis.Redis.from_url(found_services.redis_url)
    assert client.config_get("slowlog-log-slower-than") == slowlog_before
    client.close()
    assert (w1["label"], doubled["label"]) == ("x1", "x2")  # "W1" is kept for the design's own size
    assert "core_seconds" in printed and "reference / core" in printed and "x2" in printed

    # The scratch database is dropped at the end.
    admin = services.create_database(found_services.database_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (bench_database,)).fetchone() is None


def test_bench_fails_loudly_when_the_reference_disagrees(bench_database, monkeypatch, capsys):
    from herald import reference

    real = reference.run_reference

    def lossy_reference(conn, settings):
        counts = real(conn, settings)
        conn.execute("DELETE FROM notifications WHERE id = (SELECT min(id) FROM notifications)")
        return counts

    monkeypatch.setattr(reference, "run_reference", lossy_reference)
    status = bench.main(_args("--users", "200", "--triggers", "40", "--database", bench_database))
    captured = capsys.readouterr()
    assert status != 0
    assert "different notifications" in captured.err


def test_bench_delivery_figure_with_email_channels(tmp_path, bench_database, capsys):
    """--email-every 2: half the users have an email channel; the core writes their deliveries, which
    are then sent to a local SMTP sink on one connection and recorded (the delivery figure)."""
    out = tmp_path / "bench.json"
    status = bench.main(_args("--users", "300", "--triggers", "60", "--email-every", "2", "--skip-reference",
                              "--database", bench_database, "--json", str(out)))
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["workload"]["email_every"] == 2
    assert 0 < run["core_deliveries"] < run["notifications"]
    assert run["delivery_messages"] == run["core_deliveries"]  # every one sent (and received: else a problem)
    # one connection per batch (urgent, normal), one at a time
    assert 1 <= run["delivery_smtp_connections"] <= 2 and run["delivery_messages_per_second_per_connection"] > 0
    assert report["ok"] is True and run["delivery_problem"] is None
    assert "delivery msgs/s per SMTP connection" in printed
