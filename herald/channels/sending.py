"""Sending one claimed batch of deliveries through its channel's sender, chunk by chunk.

For each chunk of ``CHUNK`` deliveries:

1. ``begin_chunk``: count an attempt and renew the lease, committed on its own before anything is sent
   (a send that crashes or is killed still counts, so a poison delivery ends ``failed``);
2. in one transaction: lock the chunk's rows (``load_chunk``), send each delivery, record every answer
   (``record``), commit. While the rows are locked no other run can claim them.

A process killed between a send and its recording loses the recording, not the delivery: the rows are
still pending under the run's claim, and the retry of the task (or, once the lease runs out, a later
run) sends them again with the **same idempotency id** (:func:`idempotency_id`: the ``webhook-id`` of a
webhook, the ``Message-ID`` of an email). At least once, deduplicable by the receiver.

A sender answers each delivery with an :class:`Outcome`: ``sent``, ``failed`` (permanent: the receiver
refused it, e.g. SMTP 550, HTTP 404), ``disabled`` (HTTP 410, or the channel was switched off), or
``retry`` (temporary: a 5xx, a 429, a timeout, the SMTP server down), retried after an exponential
backoff with jitter (never sooner than a ``Retry-After``) until ``delivery_max_attempts``, then
``failed`` with the last error. An outcome with ``stop`` (the channel itself is unusable: SMTP down)
ends the task after its chunk: the rest of the batch is released unsent, for the next run.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg

from herald import db
from herald.channels.claiming import DeliveryBatch, release
from herald.config import Settings

log = logging.getLogger(__name__)

#: Deliveries sent per transaction: the most a killed task sends twice, and one commit per chunk.
CHUNK = 100
#: A Retry-After further away than this is not waited for longer.
MAX_RETRY_AFTER_SECONDS = 24 * 3600

#: Called with a stage name; tests inject faults through it. ``after_send``: the chunk was sent, its
#: answers are not recorded yet.
Checkpoint = Callable[[str], None]


def idempotency_id(delivery_id: int) -> str:
    """The id a receiver sees on every try of one delivery (webhook-id; the local part of Message-ID)."""
    return f"herald-delivery-{delivery_id}"


@dataclass(frozen=True)
class Delivery:
    """One delivery as a sender sees it (loaded with its notification, under the chunk's lock)."""

    id: int
    notification_id: int
    user_id: int
    channel: str
    address: str
    priority: str
    attempts: int  # this try included
    notification_type: str | None
    title: str | None  # None: the notification is gone
    body: str | None
    payload: str | None  # JSON text
    trigger_id: int | None
    created_at: datetime | None
    channel_enabled: bool | None  # None: the user_channels row is gone

    @property
    def idempotency_id(self) -> str:
        return idempotency_id(self.id)


@dataclass(frozen=True)
class Outcome:
    status: str  # sent | failed | disabled | retry
    error: str | None = None
    message_id: str | None = None
    retry_after: float | None = None  # seconds, from the receiver
    stop: bool = False  # the channel is unusable for now: send nothing more in this task
    disable_channel: bool = False  # switch the user_channels row off (HTTP 410)


class Sender(Protocol):
    """A channel's sender: a context manager that answers each delivery with an Outcome."""

    channel: str

    def __enter__(self) -> Sender: ...

    def __exit__(self, *exc: object) -> None: ...

    def send(self, delivery: Delivery) -> Outcome: ...


@dataclass
class DeliveryResult:
    """What one send task recorded (XCom: counts, never addresses or bodies)."""

    claim_id: str
    batch: int
    channel: str
    priority: str
    deliveries: int = 0  # recorded by this task
    sent: int = 0
    retried: int = 0  # pending again, with a later next_attempt_at
    failed: int = 0
    disabled: int = 0
    released: int = 0  # left unsent because the channel was down (stop)
    chunks: int = 0
    send_seconds: float = 0.0  # time spent in the sender (the bench's messages per second)
    duration_seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count, for the log

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def backoff_seconds(attempts: int, settings: Settings, retry_after: float | None = None,
                    rng: random.Random | None = None) -> float:
    """Wait before the next try after ``attempts`` tries: exponential, capped, with jitter in [0.5, 1],
    and never sooner than the receiver's ``Retry-After``."""
    base = min(settings.delivery_backoff_seconds * 2 ** max(attempts - 1, 0), settings.delivery_max_backoff_seconds)
    delay = base * (rng or random).uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return round(delay, 3)


def deliver_batch(
    conn: psycopg.Connection,
    batch: DeliveryBatch,
    sender: Sender,
    settings: Settings,
    *,
    checkpoint: Checkpoint | None = None,
    rng: random.Random | None = None,
) -> DeliveryResult:
    """Send every delivery ``batch`` holds through ``sender`` and record the answers; see the module doc."""
    started = time.perf_counter()
    result = DeliveryResult(batch.claim_id, batch.batch, batch.channel, batch.priority)
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    key = {"claim_id": batch.claim_id, "batch": batch.batch}
    errors: Counter[str] = Counter()
    gone: set[tuple[int, str, str]] = set()  # channel rows a receiver disabled during this task (HTTP 410)
    with sender:
        while True:
            with conn.transaction():
                ids = [r[0] for r in db.run(conn, "deliveries/begin_chunk", key | {
                    "limit": CHUNK, "lease_seconds": settings.delivery_claim_lease_seconds})]
            if not ids:
                break
            result.chunks += 1
            with conn.transaction():
                rows = db.run(conn, "deliveries/load_chunk", {"ids": ids, "claim_id": batch.claim_id}).fetchall()
                deliveries = [Delivery(*row) for row in rows]
                sending = time.perf_counter()
                outcomes = _send_chunk(sender, deliveries, gone)
                result.send_seconds += time.perf_counter() - sending
                if checkpoint:
                    checkpoint("after_send")
                _record(conn, batch, deliveries, outcomes, settings, result, rng)
            errors.update(o.error.split(":")[0] for o in outcomes if o.error)
            if any(o.stop for o in outcomes):
                result.released = release(conn, batch.claim_id, batch.batch)
                log.warning("%s channel unusable (%s); %s deliveries of batch %s/%s released for the next run",
                            batch.channel, next(o.error for o in outcomes if o.stop), result.released,
                            batch.claim_id, batch.batch)
                break
    result.errors = dict(errors.most_common(10))
    result.send_seconds = round(result.send_seconds, 4)
    result.duration_seconds = round(time.perf_counter() - started, 4)
    log.info("delivery batch %s/%s %s %s: %s recorded: %s sent, %s to retry, %s failed, %s disabled, "
             "%s released, in %s chunks", batch.claim_id, batch.batch, batch.priority, batch.channel,
             result.deliveries, result.sent, result.retried, result.failed, result.disabled, result.released,
             result.chunks)
    return result


def _send_chunk(sender: Sender, deliveries: Iterable[Delivery], gone: set[tuple[int, str, str]]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    stopped: Outcome | None = None
    for d in deliveries:
        if stopped is not None:  # the channel is down: the rest of the chunk waits with the same reason
            outcomes.append(Outcome("retry", stopped.error))
        elif d.title is None:
            outcomes.append(Outcome("failed", "the notification no longer exists"))
        elif not d.channel_enabled or (d.user_id, d.channel, d.address) in gone:
            outcomes.append(Outcome("disabled", "the channel was switched off or removed by the user"))
        else:
            try:
                outcome = sender.send(d)
            except Exception as exc:  # a sender bug must not lose the chunk's other answers
                # The type only at error level: an exception's text may hold the address.
                log.error("%s sender raised %s on delivery %s", d.channel, type(exc).__name__, d.id)
                log.debug("traceback of delivery %s", d.id, exc_info=True)
                outcome = Outcome("retry", f"sender error: {type(exc).__name__}")
            outcomes.append(outcome)
            if outcome.stop:
                stopped = outcome
            if outcome.disable_channel:
                gone.add((d.user_id, d.channel, d.address))
    return outcomes


def _record(conn: psycopg.Connection, batch: DeliveryBatch, deliveries: list[Delivery], outcomes: list[Outcome],
            settings: Settings, result: DeliveryResult, rng: random.Random | None) -> None:
    if not deliveries:
        return
    recorded = Counter(r[0] for r in db.run(conn, "deliveries/record", {
        "claim_id": batch.claim_id,
        "max_attempts": settings.delivery_max_attempts,
        "ids": [d.id for d in deliveries],
        "statuses": [o.status for o in outcomes],
        "errors": [o.error[:1000] if o.error else None for o in outcomes],
        "message_ids": [o.message_id for o in outcomes],
        "delays": [backoff_seconds(d.attempts, settings, o.retry_after, rng) if o.status == "retry" else 0.0
                   for d, o in zip(deliveries, outcomes, strict=True)],
    }))
    if sum(recorded.values()) != len(deliveries):  # cannot happen while load_chunk's locks hold
        raise RuntimeError(f"run {batch.claim_id} recorded {sum(recorded.values())} of {len(deliveries)} "
                           "deliveries it holds; nothing of this chunk was recorded")
    gone = [(d.user_id, d.channel, d.address) for d, o in zip(deliveries, outcomes, strict=True) if o.disable_channel]
    if gone:
        db.run(conn, "deliveries/disable_channels", {
            "user_ids": [g[0] for g in gone], "channels": [g[1] for g in gone], "addresses": [g[2] for g in gone]})
    result.deliveries += len(deliveries)
    result.sent += recorded["sent"]
    result.retried += recorded["pending"]
    result.failed += recorded["failed"]
    result.disabled += recorded["disabled"]
