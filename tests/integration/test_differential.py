"""Differential test: the batch pipeline and the sequential reference agree on random data sets.

Each data set is generated from ``random.Random(seed)`` and loaded twice with identical rows and ids
(emptied, sequences restarted, then the same inserts): once for the fast path
(``pipeline.run_once`` with a small batch size, a Redis namespace of its own, sometimes no Redis at
all), once for ``herald.reference.run_reference``. Then the two databases must hold the same
notifications, digests, outcomes and trigger ends. Some data sets continue with a second wave: an hour
passes (every notification ages 61 minutes, the limiter's and the cache's keys expire), more triggers
arrive, both sides run again, and are compared again.

``HERALD_DIFF_SEEDS=3,17`` runs only those seeds (to reproduce a failure).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
import redis
from psycopg.types.json import Jsonb

from herald import db, pipeline, reference, workload
from herald.claiming import ClaimRequest
from herald.config import Settings
from tests import factories as f

_ONLY = os.environ.get("HERALD_DIFF_SEEDS")
SEEDS = [int(s) for s in _ONLY.split(",")] if _ONLY else list(range(200))

#: Payload fields each built-in template needs.
FIELDS = {
    "price_drop": ("item_name", "old_price", "new_price"),
    "back_in_stock": ("item_name",),
    "event_reminder": ("event_name", "starts_at"),
    "security_alert": ("message",),
}
CUSTOM = ("order_shipped", "Shipped: {{ order }}", "Order {{ order }} is on its way ({{ carrier }}).")
FIELDS_CUSTOM = ("order", "carrier")
ENTITY_TYPES = ("item", "event")
TEXT = ("Lamp", "Chair", "Lämp ☕", "{{ 7*7 }}", "{% if 1 %}x{% endif %}", "a'b\"c", "", "Desk <b>", "99.90")


# ------------------------------------------------------------------------------------- generation


class TriggerRow(NamedTuple):
    id: int
    trigger_type: str
    entity_type: str | None
    entity_id: int | None
    user_id: int | None
    priority: str
    payload: Any
    status: str = "pending"
    claim: str | None = None  # None, "live" (another run holds it) or "expired" (its run died)


@dataclass
class DataSet:
    seed: int
    rate_limit: int
    batch_size: int
    use_redis: bool
    custom_template: tuple[str, str, str, bool] | None
    users: list[int]
    favorites: list[tuple[int, str, int]]
    preferences: list[tuple[int, str, bool]]
    triggers: list[TriggerRow]
    #: (user_id, trigger_id or None, notification_type, priority, minutes ago)
    history: list[tuple[int, int | None, str, str, float]]
    held: list[tuple[int, int]]  # pre-existing rate_limited outcomes (trigger_id, user_id)
    wave2: list[TriggerRow] = field(default_factory=list)


def _payload(rng: random.Random, trigger_type: str) -> dict[str, Any]:
    names = FIELDS.get(trigger_type, FIELDS_CUSTOM)
    payload: dict[str, Any] = {}
    for name in names:
        payload[name] = rng.choice(TEXT) if rng.random() < 0.8 else rng.randint(0, 500)
    if rng.random() < 0.3:
        payload["extra"] = {"nested": [1, 2]}
    return payload


def _triggers(rng: random.Random, ds: DataSet, first_id: int, count: int, ghosts: list[int],
              entities: list[tuple[str, int]], types: list[str]) -> list[TriggerRow]:
    rows = []
    kinds = ["fanout"] * 10 + ["direct"] * 5 + ["unknown", "missing", "ghost", "neither", "nobody",
                                                 "not_object", "direct_and_entity"]
    for i in range(count):
        kind = rng.choice(kinds)
        trigger_type = rng.choice(types)
        priority = "urgent" if rng.random() < 0.2 else "normal"
        payload: Any = _payload(rng, trigger_type)
        entity: tuple[str | None, int | None] = (None, None)
        user_id = None
        if kind in ("fanout", "unknown", "missing", "not_object"):
            entity = rng.choice(entities)
        if kind in ("direct", "direct_and_entity"):
            user_id = rng.choice(ds.users)
        if kind == "direct_and_entity":
            entity = rng.choice(entities)
        if kind == "unknown":
            trigger_type = rng.choice(["teleport_ready", "Price_Drop", ""])
        if kind == "missing":
            trigger_type = rng.choice(list(FIELDS))
            payload = _payload(rng, trigger_type)
            del payload[rng.choice(FIELDS[trigger_type])]
            if rng.random() < 0.5:  # a missing field on a direct trigger too
                entity, user_id = (None, None), rng.choice(ds.users)
        if kind == "not_object":
            payload = rng.choice([["item_name"], "Lamp", 42, None])
        if kind == "ghost":
            user_id = rng.choice(ghosts)
        if kind == "neither":
            entity = rng.choice([(None, None), (None, 3), ("item", None)])
        if kind == "nobody":
            entity = (rng.choice(ENTITY_TYPES), 900 + rng.randint(0, 50))
        claim = None
        if rng.random() < 0.06:
            claim = rng.choice(["live", "expired"])
        rows.append(TriggerRow(first_id + i, trigger_type, *entity, user_id, priority, payload, claim=claim))
    return rows


def generate(seed: int) -> DataSet:
    rng = random.Random(seed)
    n_users = rng.randint(5, 30)
    candidates = list(range(1, n_users + rng.randint(1, 6)))
    users = sorted(rng.sample(candidates, n_users))
    ghosts = sorted(set(candidates) - set(users)) + [10_000 + rng.randint(0, 99)]
    custom = None
    types = list(FIELDS)
    if rng.random() < 0.3:
        custom = (*CUSTOM, rng.random() < 0.5)
        types.append(CUSTOM[0])
    entities = [(t, i) for t in ENTITY_TYPES for i in range(1, rng.randint(2, 6))]

    favorites = set()
    density = rng.uniform(0.2, 0.7)
    for user_id in users:
        for entity in entities:
            if rng.random() < density:
                favorites.add((user_id, *entity))
    for ghost in ghosts:  # favorites of users that do not exist (deleted accounts)
        if rng.random() < 0.5:
            favorites.add((ghost, *rng.choice(entities)))

    preferences = {}
    for user_id in users:
        if rng.random() < 0.35:
            preferences[(user_id, rng.choice(types))] = False
        if rng.random() < 0.15:
            preferences[(user_id, rng.choice(types))] = rng.random() < 0.5
        if rng.random() < 0.1:
            preferences[(user_id, "security_alert")] = False

    ds = DataSet(
        seed=seed, rate_limit=rng.randint(1, 5), batch_size=rng.randint(1, 8), use_redis=rng.random() < 0.8,
        custom_template=custom, users=users, favorites=sorted(favorites),
        preferences=sorted((u, t, e) for (u, t), e in preferences.items()),
        triggers=[], history=[], held=[],
    )

    # History: done triggers, some of their notifications inside the window, some older; a few
    # notifications of no trigger (digests of earlier runs); outcomes held back by an earlier run.
    n_history = rng.randint(0, 6)
    ds.triggers = [
        TriggerRow(i, rng.choice(list(FIELDS)), "item", 1, None, "normal", {"item_name": "old"}, "done")
        for i in range(1, n_history + 1)
    ]
    used: set[tuple[int, int]] = set()
    for _ in range(rng.randint(0, 3 * n_users)):
        user_id = rng.choice(users)
        minutes = rng.uniform(0.5, 55) if rng.random() < 0.6 else rng.uniform(65, 600)
        trigger_id = rng.randint(1, n_history) if n_history and rng.random() < 0.8 else None
        if trigger_id is not None and (trigger_id, user_id) in used:
            continue
        if trigger_id is not None:
            used.add((trigger_id, user_id))
        kind = "digest" if trigger_id is None else rng.choice(list(FIELDS))
        ds.history.append((user_id, trigger_id, kind, rng.choice(["normal", "urgent"]), minutes))
    for _ in range(rng.randint(0, 4) if n_history else 0):
        pair = (rng.randint(1, n_history), rng.choice(users))
        if pair not in used:
            used.add(pair)
            ds.held.append(pair)

    ds.triggers += _triggers(rng, ds, n_history + 1, rng.randint(5, 40), ghosts, entities, types)
    if rng.random() < 0.3:
        ds.wave2 = _triggers(rng, ds, len(ds.triggers) + 1, rng.randint(3, 15), ghosts, entities, types)
    return ds


# -------------------------------------------------------------------------------------- loading


def load(conn: psycopg.Connection, ds: DataSet) -> None:
    """Empty every data table and load the data set: the same rows and ids every time.

    DELETE and a sequence restart rather than TRUNCATE ... RESTART IDENTITY: the same empty tables and
    ids, but TRUNCATE costs ~150 ms here (new relation files, a forced WAL flush) and 400 of them
    would take most of the time budget; a few rows' DELETE takes about a millisecond.
    """
    with conn.transaction(), conn.cursor() as cur:
        for table in workload.CONTRACT_DATA_TABLES:
            cur.execute(f"DELETE FROM {table}")  # fixed names
        for table in ("notifications", "notification_triggers"):
            cur.execute("SELECT setval(pg_get_serial_sequence(%s, 'id'), 1, false)", (table,))
        cur.execute("DELETE FROM notification_templates")
        db.run(conn, "migrations/0003_builtin_templates")
        if ds.custom_template:
            cur.execute("INSERT INTO notification_templates (trigger_type, title_template, body_template,"
                        " bypass_preferences) VALUES (%s, %s, %s, %s)", ds.custom_template)
        cur.executemany("INSERT INTO users (id, email) VALUES (%s, %s)",
                        [(u, f"user{u}@example.test") for u in ds.users])
        cur.executemany("INSERT INTO user_favorites (user_id, entity_type, entity_id) VALUES (%s, %s, %s)",
                        ds.favorites)
        cur.executemany("INSERT INTO user_notification_preferences (user_id, notification_type, enabled)"
                        " VALUES (%s, %s, %s)", ds.preferences)
        _insert_triggers(cur, ds.triggers)
        cur.executemany(
            "INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, priority,"
            " created_at) VALUES (%s, %s, %s, 'earlier', 'earlier', %s, now() - make_interval(secs => %s))",
            [(u, t, kind, prio, minutes * 60) for u, t, kind, prio, minutes in ds.history],
        )
        cur.executemany("INSERT INTO notification_outcomes (trigger_id, user_id, outcome, reason)"
                        " VALUES (%s, %s, 'rate_limited', 'over the per-user rate limit')", ds.held)


def _insert_triggers(cur: psycopg.Cursor, rows: list[TriggerRow]) -> None:
    cur.executemany(
        "INSERT INTO notification_triggers (id, trigger_type, entity_type, entity_id, user_id, priority,"
        " payload, status, processed_at, recipient_count, claimed_by, claimed_at, claim_expires_at, attempts)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
        "  CASE WHEN %s = 'done' THEN now() - interval '2 hours' END, CASE WHEN %s = 'done' THEN 1 END,"
        "  CASE WHEN %s::text IS NOT NULL THEN 'another-run' END,"
        "  CASE WHEN %s::text IS NOT NULL THEN now() - interval '20 minutes' END,"
        "  CASE %s::text WHEN 'live' THEN now() + interval '10 minutes'"
        "              WHEN 'expired' THEN now() - interval '5 minutes' END,"
        "  CASE WHEN %s::text IS NOT NULL THEN 1 ELSE 0 END)",
        [(*t[:6], Jsonb(t.payload), t.status, t.status, t.status, t.claim, t.claim, t.claim, t.claim)
         for t in rows],
    )
    cur.execute("SELECT setval('notification_triggers_id_seq', (SELECT max(id) FROM notification_triggers))")


def next_hour(conn: psycopg.Connection, ds: DataSet) -> None:
    """An hour passes (every notification is 61 minutes older) and the second wave of triggers arrives."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("UPDATE notifications SET created_at = created_at - interval '61 minutes'")
        _insert_triggers(cur, ds.wave2)


# -------------------------------------------------------------------------------------- snapshots


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    """What the two paths must agree on, as comparable sets."""
    q = conn.execute
    return {
        "notifications": collections.Counter(q(
            "SELECT trigger_id, user_id, notification_type, title, body, priority, payload::text"
            " FROM notifications WHERE trigger_id IS NOT NULL").fetchall()),
        "digests": collections.Counter(q(
            "SELECT user_id, title, body, priority, payload::text, created_at < now() - interval '30 minutes'"
            " FROM notifications WHERE trigger_id IS NULL").fetchall()),
        "outcomes": collections.Counter(q(
            "SELECT trigger_id, user_id, outcome, reason FROM trigger_recipient_outcomes").fetchall()),
        "digest_links": collections.Counter(q(
            "SELECT o.trigger_id, o.user_id, d.user_id, d.title FROM notification_outcomes o"
            " LEFT JOIN notifications d ON d.id = o.digest_id WHERE o.outcome = 'digested'").fetchall()),
        "triggers": collections.Counter(q(
            "SELECT id, status, recipient_count, last_error FROM notification_triggers").fetchall()),
    }


def _invariants(conn: psycopg.Connection) -> list[str]:
    """Exactly one outcome per (trigger, recipient) of every done trigger; no outcome for failed ones."""
    bad = conn.execute(
        "SELECT t.id, t.status, t.recipient_count, count(o.user_id), count(DISTINCT o.user_id)"
        " FROM notification_triggers t LEFT JOIN trigger_recipient_outcomes o ON o.trigger_id = t.id"
        " WHERE t.status <> 'pending' AND t.processed_at > now() - interval '1 hour'"
        " GROUP BY t.id HAVING count(o.user_id) <> coalesce(t.recipient_count, 0)"
        "   OR count(o.user_id) <> count(DISTINCT o.user_id)").fetchall()
    return [f"trigger {row[0]} ({row[1]}, recipient_count {row[2]}): {row[3]} outcome rows, {row[4]} users"
            for row in bad]


def diff(fast: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    problems = []
    for key in fast:
        only_fast = fast[key] - ref[key]
        only_ref = ref[key] - fast[key]
        if only_fast or only_ref:
            problems.append(f"{key}: only in fast path {sorted(only_fast.elements(), key=str)[:8]}; "
                            f"only in reference {sorted(only_ref.elements(), key=str)[:8]}")
    return problems


# -------------------------------------------------------------------------------------- the test


def _drop_namespace(client: redis.Redis, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{namespace}:*", count=10_000))
    if keys:
        client.delete(*keys)


def _coverage(conn: psycopg.Connection, ds: DataSet, counts: dict[str, int], batches: int,
              tally: collections.Counter) -> None:
    """Count which rules this data set actually exercised (from the reference's database)."""
    q = conn.execute
    history = sum(1 for t in ds.triggers if t.status == "done")
    outcomes = dict(q("SELECT outcome, count(*) FROM notification_outcomes o JOIN notification_triggers t"
                      " ON t.id = o.trigger_id WHERE t.status = 'done' AND t.processed_at > now() - interval"
                      " '10 minutes' GROUP BY 1").fetchall())
    for kind in ("skipped_preference", "failed"):
        tally[f"outcome {kind}"] += bool(outcomes.get(kind))
    tally["outcome delivered"] += counts["delivered"] > 0
    tally["outcome rate_limited"] += counts["rate_limited"] > 0
    tally["digests sent"] += counts["digests_sent"] > 0
    tally["digest of earlier runs' held outcomes"] += bool(q(
        "SELECT 1 FROM notification_outcomes WHERE outcome = 'digested' AND trigger_id <= %s LIMIT 1",
        (history,)).fetchone())
    errors = [r[0] for r in q("SELECT last_error FROM notification_triggers WHERE status = 'failed'")]
    for label, needle in (("unknown trigger_type", "unknown trigger_type"),
                          ("payload missing a field", "payload is missing a field"),
                          ("payload not an object", "payload must be a JSON object"),
                          ("direct user does not exist", "does not exist"),
                          ("neither user nor entity", "neither user_id nor entity")):
        tally[f"failed: {label}"] += any(needle in e for e in errors)
    tally["fan-out entity nobody favorited"] += bool(q(
        "SELECT 1 FROM notification_triggers WHERE status = 'done' AND user_id IS NULL"
        " AND recipient_count = 0 LIMIT 1").fetchone())
    tally["direct trigger delivered"] += bool(q(
        "SELECT 1 FROM notification_triggers t JOIN notifications n ON n.trigger_id = t.id"
        " WHERE t.user_id IS NOT NULL LIMIT 1").fetchone())
    tally["preference bypass (disabled, still delivered)"] += bool(q(
        "SELECT 1 FROM notifications n JOIN user_notification_preferences p ON p.user_id = n.user_id"
        " AND p.notification_type = n.notification_type AND NOT p.enabled"
        " WHERE n.title <> 'earlier' LIMIT 1").fetchone())
    tally["urgent delivered to a user at or over the limit"] += bool(q(
        "SELECT 1 FROM notifications n JOIN notification_triggers t ON t.id = n.trigger_id"
        " WHERE t.priority = 'urgent' AND n.title <> 'earlier' AND (SELECT count(*) FROM notifications m"
        "  WHERE m.user_id = n.user_id AND m.created_at > now() - interval '1 hour') > %s LIMIT 1",
        (ds.rate_limit,)).fetchone())
    inside = {u for u, _, _, _, minutes in ds.history if minutes < 60}
    limited = {r[0] for r in q("SELECT DISTINCT user_id FROM notification_outcomes WHERE reason = %s"
                               " AND trigger_id > %s", (reference.RATE_LIMITED_REASON, history))}
    tally["rate-limited user with earlier notifications in the window"] += bool(inside & limited)
    tally["earlier notifications outside the window"] += any(m > 60 for *_, m in ds.history)
    tally["several fast-path batches"] += batches > 1
    tally["live claim of another run left alone"] += any(t.claim == "live" for t in ds.triggers + ds.wave2)
    tally["expired claim taken over"] += any(t.claim == "expired" for t in ds.triggers + ds.wave2)
    tally["no Redis (PostgreSQL fallback)"] += not ds.use_redis
    tally["second wave an hour later"] += bool(ds.wave2)
    tally["custom template"] += ds.custom_template is not None


#: What the data sets must exercise, each in at least 3 of the 200 (so the test cannot pass vacuously).
REQUIRED = (
    "outcome delivered", "outcome skipped_preference", "outcome rate_limited", "outcome failed",
    "digests sent", "digest of earlier runs' held outcomes", "digests sent an hour later",
    "failed: unknown trigger_type", "failed: payload missing a field", "failed: payload not an object",
    "failed: direct user does not exist", "failed: neither user nor entity",
    "fan-out entity nobody favorited", "direct trigger delivered",
    "preference bypass (disabled, still delivered)", "urgent delivered to a user at or over the limit",
    "rate-limited user with earlier notifications in the window", "earlier notifications outside the window",
    "several fast-path batches", "live claim of another run left alone", "expired claim taken over",
    "no Redis (PostgreSQL fallback)", "second wave an hour later", "custom template",
)
COMPARED_COUNTS = ("delivered", "skipped_preference", "rate_limited", "failed",
                   "triggers", "triggers_done", "triggers_failed", "recipients", "digests_sent")


def _run_fast(pg: psycopg.Connection, client: redis.Redis, ds: DataSet, s: Settings,
              use_redis: bool) -> tuple[list[dict[str, Any]], dict[str, int], int, list[str]]:
    """Load and run the fast path (and its second wave): snapshots, wave-1 counts, batches, problems."""
    load(pg, ds)
    summary, results = pipeline.run_once(pg, client if use_redis else None, s,
                                         ClaimRequest(f"diff-{ds.seed}-a", batch_size=ds.batch_size))
    snapshots, problems = [snapshot(pg)], [f"fast path: {p}" for p in _invariants(pg)]
    if ds.wave2:
        next_hour(pg, ds)
        _drop_namespace(client, s.cache_namespace)  # an hour later the limiter's and cache's keys expired
        pipeline.run_once(pg, client if use_redis else None, s,
                          ClaimRequest(f"diff-{ds.seed}-b", batch_size=ds.batch_size))
        snapshots.append(snapshot(pg))
        problems += [f"fast path, wave 2: {p}" for p in _invariants(pg)]
    return snapshots, summary.counts, len(results), problems


def test_fast_path_and_reference_agree_on_random_data_sets(pg, redis_client, settings, capsys):
    # Commit durability is not what this test is about: don't wait for WAL flushes (this session only).
    pg.execute("SET synchronous_commit = off")
    started = time.perf_counter()
    tally: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    failures: list[str] = []
    for seed in SEEDS:
        ds = generate(seed)
        namespace = f"{settings.cache_namespace}:diff-{seed}"
        s = dataclasses.replace(settings, cache_namespace=namespace, rate_limit=ds.rate_limit)
        problems: list[str] = []
        try:
            fast, fast_counts, batches, problems = _run_fast(pg, redis_client, ds, s, ds.use_redis)

            load(pg, ds)  # the same rows and ids again, for the reference
            counts = reference.run_reference(pg, s)
            ref = [snapshot(pg)]
            problems += [f"reference: {p}" for p in _invariants(pg)]
            problems += [f"counts[{key!r}]: fast path {fast_counts[key]}, reference {counts[key]}"
                         for key in COMPARED_COUNTS if counts[key] != fast_counts[key]]
            _coverage(pg, ds, counts, batches, tally)
            totals.update({k: v for k, v in counts.items() if k in COMPARED_COUNTS})
            if ds.wave2:
                next_hour(pg, ds)
                later = reference.run_reference(pg, s)
                ref.append(snapshot(pg))
                problems += [f"reference, wave 2: {p}" for p in _invariants(pg)]
                tally["digests sent an hour later"] += later["digests_sent"] > 0
            for wave, (a, b) in enumerate(zip(fast, ref, strict=True), start=1):
                problems += [f"after wave {wave}: {p}" for p in diff(a, b)]
        except Exception as exc:  # one data set's crash is reported with its seed; the others still run
            problems.append(f"raised {type(exc).__name__}: {exc}")
        finally:
            _drop_namespace(redis_client, namespace)
        tally["data sets"] += 1
        if problems:
            failures.append(
                f"seed {seed} (rate_limit={ds.rate_limit}, batch_size={ds.batch_size}, redis={ds.use_redis}, "
                f"{len(ds.users)} users, {len(ds.triggers)}+{len(ds.wave2)} triggers; rerun with "
                f"HERALD_DIFF_SEEDS={seed}):\n  " + "\n  ".join(problems))
    elapsed = time.perf_counter() - started

    with capsys.disabled():
        print(f"\ndifferential: {tally['data sets']} data sets in {elapsed:.1f}s, "
              f"{len(failures)} differ; totals (first wave): {dict(totals)}")
        for key in sorted(tally):
            print(f"  {key:60} {tally[key]}")
    assert not failures, f"{len(failures)} of {len(SEEDS)} data sets differ:\n" + "\n".join(failures[:5])
    if len(SEEDS) >= 200:
        thin = {k: tally[k] for k in REQUIRED if tally[k] < 3}
        assert not thin, f"rules exercised by fewer than 3 of {len(SEEDS)} data sets: {thin}"


# -------------------------------------------------------------------- the reference on its own terms


def test_reference_leaves_triggers_claimed_by_a_live_run(pg, settings):
    f.add_users(pg, [1])
    held = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "a"})
    expired = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "b"})
    claim = ("UPDATE notification_triggers SET claimed_by = %s,"
             " claim_expires_at = now() + make_interval(mins => %s) WHERE id = %s")
    pg.execute(claim, ("other", 5, held))
    pg.execute(claim, ("dead", -1, expired))
    counts = reference.run_reference(pg, settings)
    assert counts["triggers"] == 1 and counts["delivered"] == 1
    assert f.trigger(pg, held)["status"] == "pending"
    assert f.trigger(pg, expired)["status"] == "done"


def test_reference_rules_one_by_one(pg, settings):
    settings = dataclasses.replace(settings, rate_limit=2)
    f.add_users(pg, [1, 2, 3])
    f.add_favorites(pg, [1, 2, 3, 4], "item", 1)  # 4 does not exist
    f.disable(pg, 2, "back_in_stock")
    f.disable(pg, 3, "security_alert")
    pg.execute("INSERT INTO notifications (user_id, notification_type, title, body, priority)"
               " VALUES (3, 'price_drop', 'x', 'x', 'normal')")
    first = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "a"})
    second = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "b"})
    alert = f.add_trigger(pg, "security_alert", user_id=3, priority="urgent", payload={"message": "m"})
    ghost = f.add_trigger(pg, "security_alert", user_id=99, payload={"message": "m"})
    nobody = f.add_trigger(pg, "back_in_stock", entity=("item", 2), payload={"item_name": "c"})

    counts = reference.run_reference(pg, settings)

    assert f.outcomes_of(pg, alert) == {3: "delivered"}  # urgent first, bypasses the preference
    # User 3 then has 2 in the window (one earlier, the alert): both normal triggers are held for them.
    expected = {1: "delivered", 2: "skipped_preference", 3: "rate_limited", 4: "failed"}
    assert f.outcomes_of(pg, first) == expected
    assert f.outcomes_of(pg, second) == expected
    assert f.trigger(pg, ghost)["status"] == "failed"
    assert f.trigger(pg, ghost)["last_error"] == "user 99 does not exist"
    assert f.trigger(pg, nobody)["status"] == "done" and f.trigger(pg, nobody)["recipient_count"] == 0
    assert f.trigger(pg, first)["recipient_count"] == 4
    assert counts["digests_sent"] == 0  # user 3 is still at the limit

    pg.execute("UPDATE notifications SET created_at = created_at - interval '2 hours'")
    assert reference.reference_digests(pg, settings) == 1
    digest = pg.execute("SELECT user_id, title, trigger_id, payload FROM notifications"
                        " WHERE notification_type = 'digest'").fetchall()
    payload = {"held": 2, "through_trigger_id": second}
    assert digest == [(3, "2 more updates on your favorites", None, payload)]
    assert reference.reference_digests(pg, settings) == 0


def test_reference_is_idempotent_when_run_again(pg, settings):
    f.add_users(pg, [1, 2])
    f.add_favorites(pg, [1, 2], "item", 1)
    f.add_trigger(pg, "price_drop", entity=("item", 1))
    first = reference.run_reference(pg, settings)
    again = reference.run_reference(pg, settings)
    assert first["delivered"] == 2 and again["triggers"] == 0
    assert pg.execute("SELECT count(*) FROM notifications").fetchone()[0] == 2



# ------------------------------------------------------------------ fast-path bugs the oracle found


def _entity_type_without_entity_id(pg: psycopg.Connection) -> int:
    """A fan-out trigger with its entity_type but no entity_id."""
    row = pg.execute("INSERT INTO notification_triggers (trigger_type, entity_type, payload)"
                     " VALUES ('back_in_stock', 'item', %s) RETURNING id", (Jsonb({"item_name": "b"}),))
    return row.fetchone()[0]


def test_entity_type_without_entity_id_fails_alone_instead_of_blocking_the_queue(pg, redis_client, settings):
    """A trigger with entity_type but no entity_id (and no user_id) must end 'failed' on its own.

    Found by this test: claiming.claim sorted the claimed (entity_type, entity_id) pairs, ("item", None)
    against ("item", 1) raised TypeError, the claim transaction rolled back, and every later run hit
    the same row: one poison trigger blocked the whole queue.
    """
    f.add_users(pg, [1])
    f.add_favorites(pg, [1], "item", 1)
    good = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "a"})
    poison = _entity_type_without_entity_id(pg)

    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-poison"))

    assert f.notifications_of(pg, good) == [1]
    assert f.trigger(pg, poison)["status"] == "failed"
    assert "neither user_id nor entity_type and entity_id" in f.trigger(pg, poison)["last_error"]


def test_disabled_type_with_a_comma_stays_disabled_on_a_cache_hit(pg, redis_client, settings):
    """A user who disabled a type whose name holds a comma must not get it from the second batch on.

    Found by this test: the preferences cache stored the disabled types joined by "," and split them on
    read, so "promo,weekly" came back as {"promo", "weekly"}: the first batch (PostgreSQL) skipped the
    user, the next batch within the TTL (a cache hit) delivered. The cache now stores JSON.
    """
    pg.execute("INSERT INTO notification_templates VALUES ('promo,weekly', 'Promo {{ n }}', 'x', false)")
    f.add_users(pg, [1])
    f.disable(pg, 1, "promo,weekly")
    first = f.add_trigger(pg, "promo,weekly", user_id=1, payload={"n": 1})
    second = f.add_trigger(pg, "promo,weekly", user_id=1, payload={"n": 2})

    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-comma", batch_size=1))  # two batches

    assert f.outcomes_of(pg, first) == {1: "skipped_preference"}
    assert f.outcomes_of(pg, second) == {1: "skipped_preference"}


def test_a_template_that_raises_on_a_payload_fails_that_trigger_only(pg, redis_client, settings):
    """A template error other than a missing field must fail its trigger, not the whole batch.

    Found by this test: Template.render turned only jinja2's UndefinedError/TemplateError into RenderError.
    An operator's template doing arithmetic ("{{ ((old_price - new_price) / old_price * 100) | round }}")
    raised ZeroDivisionError or TypeError (prices sent as strings, as the built-in payloads do) out of
    process_batch: the batch's transaction rolled back, its good triggers with it.
    """
    pg.execute("UPDATE notification_templates SET body_template = %s WHERE trigger_type = 'price_drop'",
               ("{{ ((old_price - new_price) / old_price * 100) | round }}% off",))
    f.add_users(pg, [1])
    good = f.add_trigger(pg, "price_drop", user_id=1,
                         payload={"item_name": "Lamp", "old_price": 40, "new_price": 30})
    zero = f.add_trigger(pg, "price_drop", user_id=1,
                         payload={"item_name": "Free", "old_price": 0, "new_price": 0})
    text = f.add_trigger(pg, "price_drop", user_id=1,
                         payload={"item_name": "Desk", "old_price": "9", "new_price": "8"})

    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-template-raises"))

    assert f.notifications_of(pg, good) == [1]
    assert f.trigger(pg, zero)["status"] == "failed" and f.trigger(pg, zero)["last_error"]
    assert f.trigger(pg, text)["status"] == "failed" and f.trigger(pg, text)["last_error"]


def test_reference_fails_an_entity_type_without_entity_id_alone(pg, settings):
    f.add_users(pg, [1])
    f.add_favorites(pg, [1], "item", 1)
    good = f.add_trigger(pg, "back_in_stock", entity=("item", 1), payload={"item_name": "a"})
    poison = _entity_type_without_entity_id(pg)
    counts = reference.run_reference(pg, settings)
    assert counts["triggers_done"] == 1 and counts["triggers_failed"] == 1
    assert f.notifications_of(pg, good) == [1]
    assert "neither user_id nor entity_type and entity_id" in f.trigger(pg, poison)["last_error"]
