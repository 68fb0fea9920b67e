"""Fault cases with batch processes of their own (``tests/faults/worker.py``) against real servers.

Each case ends with :func:`settle`: ``herald verify`` clean, every trigger finished, 0 lost, 0
duplicated, 0 over the limit, and the exact counts of the case checked.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time

import redis

from herald import claiming, housekeeping
from herald.claiming import ClaimRequest
from tests import factories as f
from tests.faults.conftest import settle
from tests.faults.worker import APPLICATION_NAME


def scalar(pg, sql: str, params=None):
    return pg.execute(sql, params).fetchone()[0]


def fanout_setup(pg, users: int, triggers: int, entity: int = 1) -> list[int]:
    pg.execute("INSERT INTO users (id) SELECT g FROM generate_series(1, %s) g ON CONFLICT DO NOTHING", (users,))
    pg.execute("INSERT INTO user_favorites (user_id, entity_type, entity_id)"
               " SELECT g, 'item', %s FROM generate_series(1, %s) g", (entity, users))
    return [f.add_trigger(pg, "price_drop", entity=("item", entity)) for _ in range(triggers)]


def test_batch_process_sigkilled_mid_batch_then_retried(pg, faults, settings):
    ids = fanout_setup(pg, 200, 3)
    (batch,) = claiming.claim(pg, ClaimRequest("run-kill"), settings)
    victim = faults.worker("batch", "run-kill", "0", pause_at="before_write")
    victim.wait_reached()
    victim.kill()  # SIGKILL between its decisions and its writes
    assert scalar(pg, "SELECT count(*) FROM notifications") == 0
    retry = faults.worker("batch", "run-kill", "0").result()  # the task's retry, a new process
    assert (retry["triggers_done"], retry["delivered"]) == (3, 600)
    assert [f.trigger(pg, t)["attempts"] for t in ids] == [2, 2, 2]
    settle(pg, settings, "batch process SIGKILLed mid-batch", "SIGKILL of the batch's process after its "
           "rate-limit decisions, before its writes; then the task's retry in a new process")


def test_database_connection_terminated_mid_batch(pg, faults, settings):
    fanout_setup(pg, 200, 3)
    claiming.claim(pg, ClaimRequest("run-term"), settings)
    victim = faults.worker("batch", "run-term", "0", pause_at="before_write")
    victim.wait_reached()
    terminated = scalar(pg, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            " WHERE application_name = %s", (APPLICATION_NAME,))
    assert terminated == 1
    victim.go()
    failed = victim.result(ok=False)
    assert "terminat" in failed["stderr"].lower() or "closed" in failed["stderr"].lower(), failed["stderr"][-2000:]
    assert scalar(pg, "SELECT count(*) FROM notifications") == 0
    retry = faults.worker("batch", "run-term", "0").result()
    assert retry["delivered"] == 600
    settle(pg, settings, "database connection terminated mid-batch",
           "pg_terminate_backend of the batch's connection after its decisions; then the retry")


def test_redis_stopped_mid_batch_and_flushed_mid_window(pg, faults, settings, valkeys):
    first_server = valkeys()
    url = f"redis://127.0.0.1:{first_server.port}/0"
    env = faults.env(redis_url=url)
    f.add_users(pg, [1, 2, 3])
    f.add_favorites(pg, [1, 2, 3], "item", 1)
    for i in range(12):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"a{i}"})
    # A batch loses Redis between loading its triggers and reading the cache: it goes on from PostgreSQL.
    claiming.claim(pg, ClaimRequest("run-1"), settings)
    worker = faults.worker("batch", "run-1", "0", pause_at="after_load", env=env)
    worker.wait_reached()
    first_server.stop()
    worker.go()
    first = worker.result()
    assert (first["delivered"], first["redis_available"]) == (36, False)
    # Redis is back, empty; a run warms the cache, then everything in it is flushed mid-window.
    url = f"redis://127.0.0.1:{valkeys().port}/0"
    env = faults.env(redis_url=url)
    for i in range(5):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"b{i}"})
    assert faults.run("run-2", env=env)["counts"]["delivered"] == 15
    client = redis.Redis.from_url(url)
    assert client.dbsize() > 0
    client.flushall()
    client.close()
    for i in range(6):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"c{i}"})
    third = faults.run("run-3", env=env)
    assert (third["counts"]["delivered"], third["counts"]["rate_limited"]) == (9, 9)  # 17 + 3 = 20 each
    per_user = dict(pg.execute("SELECT user_id, count(*) FROM notifications GROUP BY 1").fetchall())
    assert per_user == {1: 20, 2: 20, 3: 20}
    settle(pg, settings, "Redis stopped mid-batch, then flushed mid-window",
           "the batch's Redis server stopped after its load; later FLUSHALL with 17 of 20 notifications "
           "in every user's window")


def test_lease_runs_out_while_its_batch_is_working(pg, faults, settings):
    short = dataclasses.replace(settings, claim_lease_seconds=1)
    fanout_setup(pg, 100, 4)
    claiming.claim(pg, ClaimRequest("run-slow"), short)
    slow = faults.worker("batch", "run-slow", "0", pause_at="before_write",
                         env=faults.env(claim_lease_seconds=1))
    slow.wait_reached()
    time.sleep(2)  # the lease ran out; the batch is still holding its triggers
    assert scalar(pg, "SELECT count(*) FROM notification_triggers WHERE claim_expires_at < now()") == 4
    eager = faults.worker("run", "run-eager").result()  # another run, in its own process
    assert eager["counts"]["triggers"] == 0
    assert housekeeping.run(pg, None, short)["expired_claims_released"] == 0
    slow.go()
    assert slow.result()["delivered"] == 400
    assert scalar(pg, "SELECT count(DISTINCT claimed_by) FROM notification_triggers") == 1
    settle(pg, settings, "lease runs out while its batch works",
           "a 1 s lease; the batch paused 2 s before its writes while another run claimed and "
           "housekeeping released expired claims")


def test_two_batches_race_the_rate_limit_for_the_same_users(pg, faults, settings):
    f.add_users(pg, range(1, 51))
    f.add_favorites(pg, range(1, 51), "item", 1)
    pg.execute("INSERT INTO notifications (user_id, notification_type, title, body, priority)"
               " SELECT u, 'price_drop', 'old', 'old', 'normal' FROM generate_series(1, 50) u,"
               " generate_series(1, 12)")
    for i in range(6):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"a{i}"})
    claiming.claim(pg, ClaimRequest("run-a"), settings)
    for i in range(6):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"b{i}"})
    claiming.claim(pg, ClaimRequest("run-b"), settings)
    a = faults.worker("batch", "run-a", "0", pause_at="before_write")
    a.wait_reached()  # A decided 6 more for each user (12 + 6 = 18), not committed
    b = faults.worker("batch", "run-b", "0")
    assert b.running(after=2), "B decided while A's decisions were uncommitted"
    a.go()
    assert a.result()["delivered"] == 300
    b_result = b.result()
    assert (b_result["delivered"], b_result["rate_limited"]) == (100, 200)  # 2 more each, 4 held
    assert {n for (n,) in pg.execute("SELECT count(*) FROM notifications GROUP BY user_id")} == {20}
    settle(pg, settings, "two batches race the rate limit",
           "two processes decide for the same 50 users at once, each user at 12 of 20")


def test_fallback_at_fifty_thousand_recipients(pg, faults, settings):
    fanout_setup(pg, 50_000, 1)
    pg.execute("INSERT INTO user_notification_preferences (user_id, notification_type, enabled)"
               " SELECT g, 'price_drop', false FROM generate_series(5, 50000, 5) g")
    no_redis = faults.env(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    summary = faults.run("run-big", env=no_redis)
    assert (summary["counts"]["delivered"], summary["counts"]["skipped_preference"]) == (40_000, 10_000)
    settle(pg, settings, "Redis down, 50,000 recipients in one batch",
           "no Redis at all; one fan-out trigger to 50,000 users decided from PostgreSQL alone")


def test_poison_payloads_among_innocents(pg, faults, settings):
    f.add_users(pg, range(1, 21))
    f.add_favorites(pg, range(1, 21), "item", 1)
    innocents = [f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"i{i}"})
                 for i in range(5)]
    for payload_sql in ("('{\"item_name\": ' || repeat('7', 9000) || '}')::jsonb",
                        "('{\"item_name\": ' || repeat('{\"a\":', 3000) || '1' || repeat('}', 3000) || '}')::jsonb"):
        pg.execute("INSERT INTO notification_triggers (trigger_type, entity_type, entity_id, payload)"
                   f" VALUES ('back_in_stock', 'item', 1, {payload_sql})")  # fixed SQL
    innocents += [f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"j{i}"})
                  for i in range(5)]
    summary = faults.run("run-poison")
    assert (summary["batches"], summary["counts"]["triggers_done"], summary["counts"]["triggers_failed"]) == (1, 10, 2)
    assert all(f.trigger(pg, t)["status"] == "done" for t in innocents)
    settle(pg, settings, "poison payloads among innocents",
           "a 9,000-digit number and 3,000-deep nesting in one batch with 10 good triggers")


def test_backlog_bigger_than_ten_runs_slices(pg, faults, settings):
    f.add_users(pg, range(1, 51))
    for i in range(250):
        f.add_trigger(pg, "back_in_stock", user_id=i % 50 + 1, payload={"item_name": f"i{i}"})
    env = faults.env(max_triggers_per_run=20)
    runs = 0
    while scalar(pg, "SELECT count(*) FROM notification_triggers WHERE status = 'pending'"):
        faults.run(f"run-{runs}", env=env)
        runs += 1
        assert runs <= 13
    assert runs == 13
    assert scalar(pg, "SELECT max(attempts) FROM notification_triggers") == 1
    assert scalar(pg, "SELECT count(*) FROM notifications") == 250
    settle(pg, settings, "backlog of 12.5 runs' slices", "250 triggers, 20 per run: 13 runs, each releasing "
           "nothing early and failing nothing as poison", triggers=250)


def test_repeated_dry_runs_then_a_real_one(pg, faults, settings):
    ids = fanout_setup(pg, 50, 4)
    for n in range(6):
        dry = faults.run(f"dry-{n}", "--dry-run")
        assert dry["counts"]["delivered"] == 200
    assert [f.trigger(pg, t)["attempts"] for t in ids] == [0, 0, 0, 0]
    assert scalar(pg, "SELECT count(*) FROM notifications") == 0
    real = faults.run("real")
    assert real["counts"]["delivered"] == 200
    settle(pg, settings, "six dry runs, then a real one",
           "six dry runs in processes of their own, then a real run: nothing written before, all after")


# ---------------------------------------------------------------------------------- malformed input


def malformed_payload(rng: random.Random, depth: int = 0):
    """Any JSON value PostgreSQL accepts: nested, huge, empty, odd numbers and text."""
    kind = rng.randrange(10)
    if kind == 0 and depth < 4:
        return {rng.choice(["item_name", "x", "", "ü", "{{", "old_price"]): malformed_payload(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if kind == 1 and depth < 4:
        return [malformed_payload(rng, depth + 1) for _ in range(rng.randrange(4))]
    return rng.choice([
        None, True, False, 0, -1, 1e308, -1e-308, 2**80, 3.5, "", " ", "ü☕\u200b", "{{ 7*7 }}",
        "{% for x in range(10**9) %}x{% endfor %}", "x" * rng.choice([10, 5_000, 200_000]), "\\",
        "'; DROP TABLE users; --",
    ])


def test_a_thousand_malformed_triggers(pg, faults, settings):
    rng = random.Random(11)
    f.add_users(pg, range(1, 31))
    f.add_favorites(pg, range(1, 31), "item", 1)
    types = ["price_drop", "back_in_stock", "event_reminder", "security_alert", "no_such_type", "", "x" * 300]
    rows = []
    for _ in range(1000):
        payload = malformed_payload(rng)
        if rng.random() < 0.5:  # an object with the right keys and wrong values is the likelier mistake
            payload = {"item_name": malformed_payload(rng), "old_price": malformed_payload(rng),
                       "new_price": malformed_payload(rng), "event_name": malformed_payload(rng),
                       "starts_at": malformed_payload(rng), "message": malformed_payload(rng)}
        direct = rng.random() < 0.3
        rows.append((rng.choice(types), None if direct else rng.choice(["item", "event", None, ""]),
                     None if direct else rng.choice([1, 2, None, -5]), rng.choice([1, 7, 999, -1]) if direct else None,
                     rng.choice(["normal", "urgent"]), json.dumps(payload)))
    with pg.cursor() as cur:
        cur.executemany("INSERT INTO notification_triggers (trigger_type, entity_type, entity_id, user_id, priority,"
                        " payload) VALUES (%s, %s, %s, %s, %s, %s::jsonb)", rows)
    good = [f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"g{i}"}) for i in range(10)]

    settings = dataclasses.replace(settings, rate_limit=100_000)  # this case is about input, not the limit
    summary = faults.run("run-malformed", env=faults.env(rate_limit=settings.rate_limit))
    counts = summary["counts"]
    assert counts["triggers"] == 1010 and counts["triggers_done"] + counts["triggers_failed"] == 1010
    assert all(f.notifications_of(pg, t) == list(range(1, 31)) for t in good)
    reasons = scalar(pg, "SELECT count(*) FROM notification_triggers WHERE status = 'failed'"
                         " AND (last_error IS NULL OR last_error = '')")
    assert reasons == 0  # every failure says why
    assert counts["triggers_failed"] > 300  # most of them really are broken
    settle(pg, settings, "1,000 generated malformed triggers",
           "any JSON payload (nested, huge strings and numbers, template syntax, NULLs), unknown and "
           "odd types, missing or dangling entities and users, among 10 good triggers", triggers=1010)
