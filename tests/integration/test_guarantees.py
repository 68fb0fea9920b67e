"""The promises under concurrency and lost claims, one test per way they were broken (issue 11).

Each test drives real batches on their own PostgreSQL connections in threads, pauses one at the worst
moment (a checkpoint of ``process_batch``), does what would break the promise from another
connection, and then checks the exact outcome and ``herald verify``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import pytest

from herald import claiming, db, digests, housekeeping, pipeline, verify
from herald.claiming import Batch, ClaimRequest
from herald.processing import BatchResult, process_batch
from tests import factories as f

PAUSE_TIMEOUT = 30


class PausedBatch:
    """``process_batch`` in a thread on a connection of its own, held at ``stage`` until ``resume()``."""

    def __init__(self, db_url: str, redis_client, batch: Batch, settings, stage: str) -> None:
        self.reached = threading.Event()
        self._go = threading.Event()
        self.result: BatchResult | None = None
        self.error: BaseException | None = None

        def checkpoint(reached: str) -> None:
            if reached == stage:
                self.reached.set()
                assert self._go.wait(PAUSE_TIMEOUT), "never resumed"

        def work() -> None:
            try:
                with db.connection(db_url, autocommit=True) as conn:
                    self.result = process_batch(conn, redis_client, batch, settings, checkpoint=checkpoint)
            except BaseException as exc:  # reported by join()
                self.error = exc
                self.reached.set()

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()
        assert self.reached.wait(PAUSE_TIMEOUT), f"the batch never reached {stage}"
        if self.error:
            raise self.error

    def resume(self) -> BatchResult:
        self._go.set()
        return self.join()

    def join(self) -> BatchResult:
        self._thread.join(PAUSE_TIMEOUT)
        assert not self._thread.is_alive(), "the batch did not finish"
        if self.error:
            raise self.error
        assert self.result is not None
        return self.result


class Background:
    """Run ``fn`` on a connection of its own in a thread; ``running()`` tells whether it is blocked."""

    def __init__(self, db_url: str, fn: Callable) -> None:
        self.value = None
        self.error: BaseException | None = None

        def work() -> None:
            try:
                with db.connection(db_url, autocommit=True) as conn:
                    self.value = fn(conn)
            except BaseException as exc:
                self.error = exc

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def running(self, after: float = 1.0) -> bool:
        self._thread.join(after)
        return self._thread.is_alive()

    def join(self):
        self._thread.join(PAUSE_TIMEOUT)
        assert not self._thread.is_alive(), "still blocked"
        if self.error:
            raise self.error
        return self.value


def assert_verified(pg, settings) -> None:
    report = verify.verify(pg, settings)
    assert report.ok, report.describe()


def count(pg, sql: str, params=None) -> int:
    return pg.execute(sql, params).fetchone()[0]


# ------------------------------------------------------------------------------------ lost claims


def test_a_lease_running_out_mid_batch_hands_nothing_to_another_run(db_url, pg, redis_client, settings):
    """Defect 1: the batch holds its triggers' rows until it commits, so a run that comes after the
    lease ran out (or housekeeping) cannot take them, and the batch's writes stay the only ones."""
    settings = dataclasses.replace(settings, claim_lease_seconds=1)
    f.add_users(pg, range(1, 11))
    f.add_favorites(pg, range(1, 11), "item", 1)
    triggers = [f.add_trigger(pg, "price_drop", entity=("item", 1)) for _ in range(3)]
    (batch,) = claiming.claim(pg, ClaimRequest("slow-run"), settings)

    slow = PausedBatch(db_url, redis_client, batch, settings, "before_write")
    time.sleep(1.5)  # the lease (1 s from the batch's start) has run out; the batch is still working
    assert count(pg, "SELECT count(*) FROM notification_triggers WHERE claim_expires_at < now()") == 3
    assert claiming.claim(pg, ClaimRequest("eager-run"), settings) == []
    assert housekeeping.run(pg, redis_client, settings)["expired_claims_released"] == 0
    result = slow.resume()

    assert (result.triggers_done, result.delivered) == (3, 30)
    assert {f.trigger(pg, t)["claimed_by"] for t in triggers} == {"slow-run"}
    assert count(pg, "SELECT count(*) FROM notifications") == 30
    assert count(pg, "SELECT count(*) FROM notification_outcomes") == 0
    assert_verified(pg, settings)


def test_a_batch_whose_claim_was_taken_over_while_it_waited_writes_nothing(pg, redis_client, settings):
    """Defect 1: a batch that starts after another run took its triggers over finds nothing of its own."""
    settings = dataclasses.replace(settings, claim_lease_seconds=1)
    f.add_users(pg, range(1, 6))
    f.add_favorites(pg, range(1, 6), "item", 1)
    trigger = f.add_trigger(pg, "price_drop", entity=("item", 1))
    (late,) = claiming.claim(pg, ClaimRequest("queued-run"), settings)
    time.sleep(1.2)  # its batch waited in the pool queue longer than the lease
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("next-run"))
    assert f.trigger(pg, trigger)["claimed_by"] == "next-run"

    result = process_batch(pg, redis_client, late, settings)
    assert (result.triggers, result.delivered) == (0, 0)
    assert f.notifications_of(pg, trigger) == [1, 2, 3, 4, 5]
    assert f.trigger(pg, trigger)["attempts"] == 1  # only next-run's batch started on it
    assert_verified(pg, settings)


# ------------------------------------------------------------------------------------ rate limit


def _limit_race_setup(pg, settings, history: int) -> tuple[Batch, Batch]:
    """User 1 with ``history`` notifications in the window; two runs holding five triggers each."""
    f.add_users(pg, [1])
    pg.execute("INSERT INTO notifications (user_id, notification_type, title, body, priority)"
               " SELECT 1, 'back_in_stock', 'old', 'old', 'normal' FROM generate_series(1, %s)", (history,))
    for _ in range(5):
        f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "a"})
    (first,) = claiming.claim(pg, ClaimRequest("run-a"), settings)
    for _ in range(5):
        f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "b"})
    (second,) = claiming.claim(pg, ClaimRequest("run-b"), settings)
    return first, second


@pytest.mark.parametrize("fault", ["none", "redis flushed", "redis down for one"])
def test_two_batches_racing_for_one_user_never_pass_the_limit(db_url, pg, redis_client, settings, fault):
    """Defect 6: batch A decided 5 of the user's last 5 and has not committed; batch B decides for the
    same user meanwhile (with Redis flushed, or down for B only). B waits for A's decisions, counts
    them, and holds back all of its own: 20, never 25."""
    first, second = _limit_race_setup(pg, settings, history=15)
    a = PausedBatch(db_url, redis_client, first, settings, "before_write")
    if fault == "redis flushed":
        for key in redis_client.scan_iter(match=f"{settings.cache_namespace}:*"):
            redis_client.delete(key)
    b_client = None if fault == "redis down for one" else redis_client
    b = Background(db_url, lambda conn: process_batch(conn, b_client, second, settings))
    assert b.running(after=1.5), "B decided for the user while A's decisions were uncommitted"
    a_result = a.resume()
    b_result = b.join()

    assert (a_result.delivered, a_result.rate_limited) == (5, 0)
    assert (b_result.delivered, b_result.rate_limited) == (0, 5)
    assert count(pg, "SELECT count(*) FROM notifications WHERE user_id = 1") == 20
    assert_verified(pg, settings)


def test_decisions_for_different_users_do_not_wait_for_each_other(db_url, pg, redis_client, settings):
    """The locks are per user bucket: a batch for other users is not held up by a slow one."""
    f.add_users(pg, [1, 2])
    f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "a"})
    (first,) = claiming.claim(pg, ClaimRequest("run-a"), settings)
    f.add_trigger(pg, "back_in_stock", user_id=2, payload={"item_name": "b"})
    (second,) = claiming.claim(pg, ClaimRequest("run-b"), settings)
    assert pg.execute("SELECT hashint8(1) & 127 <> hashint8(2) & 127").fetchone()[0]
    a = PausedBatch(db_url, redis_client, first, settings, "before_write")
    b = Background(db_url, lambda conn: process_batch(conn, redis_client, second, settings))
    assert not b.running(after=5), "a batch for user 2 waited for a batch of user 1"
    assert b.join().delivered == 1
    assert a.resume().delivered == 1


# ------------------------------------------------------------------------------------ digests


def _over_limit_with_held(pg, redis_client, settings, user_id: int, held: int) -> None:
    """User ``user_id`` gets ``rate_limit`` notifications and ``held`` more are held back."""
    for i in range(settings.rate_limit + held):
        f.add_trigger(pg, "back_in_stock", user_id=user_id, payload={"item_name": f"{user_id}-{i}"})


def test_a_digest_announces_exactly_what_it_folds_while_a_batch_races_it(db_url, pg, redis_client, settings,
                                                                          monkeypatch):
    """Defect 8: the digest counts the held outcomes and folds them in one locked transaction; a batch
    for the same user that would add a held outcome in between has to wait until it committed."""
    settings = dataclasses.replace(settings, rate_limit=3)
    f.add_users(pg, [1])
    racer = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "racer"})  # the lowest id
    pg.execute("UPDATE notification_triggers SET claimed_by = 'elsewhere',"
               " claim_expires_at = now() + interval '1 hour'")
    _over_limit_with_held(pg, redis_client, settings, 1, held=2)
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    assert count(pg, "SELECT count(*) FROM notification_outcomes WHERE outcome = 'rate_limited'") == 2
    pg.execute("UPDATE notifications SET created_at = created_at - interval '61 minutes'")  # budget is back
    pg.execute("UPDATE notification_triggers SET claimed_by = 'racing-run', claim_batch = 0 WHERE id = %s", (racer,))
    racing = Batch("racing-run", 0, "normal", 1, 1)

    original = digests.db.run
    race: dict[str, Background] = {}

    def run_and_race(conn, name, params=None, **kw):
        cursor = original(conn, name, params, **kw)
        if name == "pending_digests" and "batch" not in race:  # counted; not folded yet
            race["batch"] = Background(db_url, lambda c: process_batch(c, redis_client, racing, settings))
            race["batch"].running(after=1.5)  # on the old code it would finish here, inside the gap
        return cursor

    monkeypatch.setattr(digests.db, "run", run_and_race)
    sent = digests.send_digests(pg, settings)
    monkeypatch.setattr(digests.db, "run", original)
    raced = race["batch"].join()

    (title, digest_id) = pg.execute(
        "SELECT title, id FROM notifications WHERE notification_type = 'digest'").fetchone()
    folded = count(pg, "SELECT count(*) FROM notification_outcomes WHERE digest_id = %s", (digest_id,))
    assert (sent.sent, sent.folded, folded) == (1, 2, 2)
    assert title == "2 more updates on your favorites"
    assert raced.delivered == 1  # after the digest: nothing held any more, and budget left
    assert_verified(pg, settings)


def test_a_digest_pass_reaches_every_owed_user_not_only_the_first_chunk(pg, redis_client, settings):
    """Defect 9: users 1-3 are still over their limit, users 4-5 have budget again; a pass that looked
    at the first users only would starve 4 and 5 for ever."""
    settings = dataclasses.replace(settings, rate_limit=2)
    f.add_users(pg, range(1, 6))
    for user_id in range(1, 6):
        _over_limit_with_held(pg, redis_client, settings, user_id, held=1)
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    pg.execute("UPDATE notifications SET created_at = created_at - interval '61 minutes' WHERE user_id >= 4")
    sent = digests.send_digests(pg, settings, chunk=2)
    assert (sent.sent, sent.folded, sent.waiting) == (2, 2, 3)
    assert [r[0] for r in pg.execute(
        "SELECT user_id FROM notifications WHERE notification_type = 'digest' ORDER BY 1")] == [4, 5]
    assert_verified(pg, settings)


def test_a_user_owed_a_digest_gets_it_before_any_new_normal_notification(pg, redis_client, settings):
    """Held notifications are never starved by newer ones: once budget is back, the digest goes first
    and folds what arrived meanwhile."""
    settings = dataclasses.replace(settings, rate_limit=2)
    f.add_users(pg, [1])
    _over_limit_with_held(pg, redis_client, settings, 1, held=1)
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    pg.execute("UPDATE notifications SET created_at = created_at - interval '61 minutes'")
    newer = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "newer"})
    summary, _ = pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-2"))
    assert f.outcomes_of(pg, newer) == {1: "digested"}
    assert (summary.digests, summary.counts["digested"]) == (1, 2)
    assert_verified(pg, settings)


# ------------------------------------------------------------------------------------ dry runs


def test_a_dry_run_backfill_changes_no_failed_trigger(pg, redis_client, settings):
    """Defect 5: re-driving failed triggers in a dry run used to reset them to pending for real."""
    f.add_users(pg, [1])
    failed = f.add_trigger(pg, "flash_sale", user_id=1)
    pipeline.run_once(pg, redis_client, settings, ClaimRequest("run-1"))
    before = f.trigger(pg, failed)
    assert before["status"] == "failed"
    pg.execute("INSERT INTO notification_templates VALUES ('flash_sale', 'Sale', 'Now', false)")
    window = pg.execute("SELECT created_at - interval '1 minute', created_at + interval '1 minute'"
                        " FROM notification_triggers WHERE id = %s", (failed,)).fetchone()
    summary, results = pipeline.run_once(pg, redis_client, settings, ClaimRequest(
        "dry-backfill", mode="backfill", dry_run=True, interval=tuple(window)))
    assert results[0].delivered == 1 and summary.counts["triggers_done"] == 1  # what it would do
    assert f.trigger(pg, failed) == before
    assert count(pg, "SELECT count(*) FROM notifications") == 0
