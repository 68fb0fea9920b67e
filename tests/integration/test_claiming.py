"""Claiming against real PostgreSQL: concurrency, lease expiry, bounded slices, idempotent retries."""

from __future__ import annotations

import dataclasses
import threading

from herald import claiming, db
from herald.claiming import ClaimRequest
from tests import factories as f


def _load_pending(pg, n: int, urgent_every: int = 0) -> list[int]:
    f.add_users(pg, [1])
    return [
        f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "x"},
                      priority="urgent" if urgent_every and i % urgent_every == 0 else "normal")
        for i in range(n)
    ]


def _claimed_ids(pg, claim_id: str) -> set[int]:
    return {r[0] for r in pg.execute(
        "SELECT id FROM notification_triggers WHERE claimed_by = %s", (claim_id,)).fetchall()}


def test_two_connections_claiming_at_once_never_share_a_trigger(db_url, pg, settings):
    ids = _load_pending(pg, 600)
    settings = dataclasses.replace(settings, max_triggers_per_run=250, batch_size=50)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def claim(claim_id: str) -> None:
        try:
            with db.connection(db_url, autocommit=True) as conn:
                barrier.wait()
                claiming.claim(conn, ClaimRequest(claim_id), settings)
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("run-a", "run-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    a, b = _claimed_ids(pg, "run-a"), _claimed_ids(pg, "run-b")
    assert len(a) == 250 and len(b) == 250
    assert not a & b
    assert a | b <= set(ids)


def test_expired_claim_is_reclaimed_but_a_live_one_is_not(pg, settings):
    ids = _load_pending(pg, 4)
    claiming.claim(pg, ClaimRequest("dead-run"), settings)
    assert _claimed_ids(pg, "dead-run") == set(ids)
    # A second run finds nothing while the lease holds.
    assert claiming.claim(pg, ClaimRequest("early-run"), settings) == []
    # The first run died; its lease runs out.
    pg.execute("UPDATE notification_triggers SET claim_expires_at = now() - interval '1 second' WHERE id = %s",
               (ids[0],))
    batches = claiming.claim(pg, ClaimRequest("late-run"), settings)
    assert sum(b.triggers for b in batches) == 1
    assert _claimed_ids(pg, "late-run") == {ids[0]}
    assert f.trigger(pg, ids[0])["attempts"] == 0  # claimed twice, never processed: no attempt


def test_urgent_first_and_batches_by_recipients(pg, settings):
    f.add_users(pg, range(1, 101))
    f.add_favorites(pg, range(1, 101), "item", 1)  # 100 recipients
    f.add_favorites(pg, range(1, 31), "item", 2)  # 30 recipients
    normal_big = f.add_trigger(pg, "price_drop", entity=("item", 1))
    normal_small = [f.add_trigger(pg, "price_drop", entity=("item", 2)) for _ in range(3)]
    urgent = f.add_trigger(pg, "event_reminder", entity=("item", 2), priority="urgent")
    batches = claiming.claim(pg, ClaimRequest("run", batch_size=70), settings)
    assert [(b.priority, b.triggers, b.recipients) for b in batches] == [
        ("urgent", 1, 30), ("normal", 1, 100), ("normal", 2, 60), ("normal", 1, 30)]
    assert batches[0].label == "urgent · 30 users · 1 triggers"
    rows = dict(pg.execute("SELECT id, claim_batch FROM notification_triggers").fetchall())
    assert rows[urgent] == 0 and rows[normal_big] == 1 and rows[normal_small[0]] == 2


def test_backlog_larger_than_max_map_length_takes_a_bounded_slice(pg, settings):
    ids = _load_pending(pg, 1_500)
    settings = dataclasses.replace(settings, max_batches_per_run=1024)
    first = claiming.claim(pg, ClaimRequest("run-1", batch_size=1), settings)
    assert len(first) == 1024  # [core] max_map_length
    assert len(_claimed_ids(pg, "run-1")) == 1024
    left = pg.execute("SELECT count(*) FROM notification_triggers WHERE claimed_by IS NULL").fetchone()[0]
    assert left == 1_500 - 1024  # the rest was released at once, not held
    second = claiming.claim(pg, ClaimRequest("run-2", batch_size=1), settings)
    assert len(second) == 1_500 - 1024
    assert _claimed_ids(pg, "run-1") | _claimed_ids(pg, "run-2") == set(ids)


def test_retried_claim_returns_the_same_batches(pg, settings):
    _load_pending(pg, 10, urgent_every=5)
    first = claiming.claim(pg, ClaimRequest("run", batch_size=3), settings)
    f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "late"})
    again = claiming.claim(pg, ClaimRequest("run", batch_size=3), settings)
    assert again == first
    assert len(_claimed_ids(pg, "run")) == 10  # the late trigger was not taken by the retry


class Crash(BaseException):
    """The batch's process dying mid-work (not an Exception: nothing on the way catches it)."""


def _crash(stage: str) -> None:
    if stage == "before_write":
        raise Crash


def test_poison_trigger_fails_after_max_attempts_and_innocents_are_isolated_from_it(pg, redis_client, settings):
    """A batch that crashes on every attempt: each start counts, the triggers become suspects with
    batches of their own, and only the one that keeps crashing is failed after max_attempts."""
    from herald.processing import process_batch

    poison, innocent = _load_pending(pg, 2)
    settings = dataclasses.replace(settings, max_attempts=3)

    for attempt in range(3):
        batches = claiming.claim(pg, ClaimRequest(f"run-{attempt}"), settings)
        for batch in batches:
            ids = {r[0] for r in pg.execute(
                "SELECT id FROM notification_triggers WHERE claimed_by = %s AND claim_batch = %s",
                (batch.claim_id, batch.batch))}
            try:
                process_batch(pg, redis_client, batch, settings, checkpoint=_crash if poison in ids else None)
            except Crash:
                pass
        claiming.release(pg, f"run-{attempt}")  # what finalize does for a batch that failed for good
        # The first run has both in one batch; from then on each is a suspect in a batch of its own.
        assert [b.triggers for b in batches] == [[2], [1, 1], [1]][attempt]
    assert f.trigger(pg, innocent)["status"] == "done"  # delivered on its own in the second run
    assert f.trigger(pg, poison)["attempts"] == 3
    assert claiming.claim(pg, ClaimRequest("next-run"), settings) == []
    row = f.trigger(pg, poison)
    assert row["status"] == "failed" and "gave up after 3 attempts" in row["last_error"]


def test_released_and_dry_claims_are_not_attempts(pg, redis_client, settings):
    """A deep backlog (triggers released because the slice is full) and repeated dry runs never turn
    good triggers into poison: only a processing start counts."""
    from herald import pipeline

    ids = _load_pending(pg, 30)
    settings = dataclasses.replace(settings, max_attempts=2, max_batches_per_run=2)
    for n in range(5):
        pipeline.run_once(pg, redis_client, settings, ClaimRequest(f"dry-{n}", dry_run=True, batch_size=1))
    assert {f.trigger(pg, i)["attempts"] for i in ids} == {0}
    runs = 0
    while pg.execute("SELECT count(*) FROM notification_triggers WHERE status = 'pending'").fetchone()[0]:
        pipeline.run_once(pg, redis_client, settings, ClaimRequest(f"run-{runs}", batch_size=1))
        runs += 1
        assert runs <= 15
    assert runs == 15  # two triggers a run, each released 0..14 times before its turn
    assert dict(pg.execute("SELECT status, count(*) FROM notification_triggers GROUP BY 1").fetchall()) == {"done": 30}
    assert {f.trigger(pg, i)["attempts"] for i in ids} == {1}


def test_user_filter_and_only_urgent(pg, settings):
    f.add_users(pg, [1, 2, 3])
    f.add_favorites(pg, [2], "item", 9)
    direct_1 = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "x"})
    f.add_trigger(pg, "back_in_stock", user_id=3, payload={"item_name": "x"})
    fanout_2 = f.add_trigger(pg, "price_drop", entity=("item", 9))
    urgent_3 = f.add_trigger(pg, "security_alert", user_id=3, priority="urgent", payload={"message": "m"})
    claiming.claim(pg, ClaimRequest("support", user_ids=[1, 2]), settings)
    assert _claimed_ids(pg, "support") == {direct_1, fanout_2}
    claiming.claim(pg, ClaimRequest("urgent-only", only_urgent=True), settings)
    assert _claimed_ids(pg, "urgent-only") == {urgent_3}


def test_release_gives_back_only_unfinished_claims(pg, redis_client, settings):
    from herald.processing import process_batch

    ids = _load_pending(pg, 4)
    batches = claiming.claim(pg, ClaimRequest("run", batch_size=2), settings)
    process_batch(pg, redis_client, batches[0], settings)  # the second batch "failed for good"
    assert claiming.release(pg, "run") == 2
    rows = dict(pg.execute("SELECT id, claimed_by FROM notification_triggers").fetchall())
    assert [rows[i] for i in ids] == ["run", "run", None, None]
