"""Claiming due deliveries for one run of ``notification_delivery``, as batch descriptors.

A descriptor names a batch (run id + batch number, with its channel and priority), never its rows: the
mapped send task loads its own deliveries, chunk by chunk, so XComs stay small whatever the backlog.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from herald import db
from herald.config import CHANNELS, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryBatch:
    """One send task's share of a run: the deliveries claimed by ``claim_id`` under ``batch``."""

    claim_id: str
    batch: int
    channel: str
    priority: str
    deliveries: int

    @property
    def label(self) -> str:
        """What the Airflow UI shows for the mapped task ("urgent · email · 120 deliveries")."""
        return f"{self.priority} · {self.channel} · {self.deliveries:,} deliveries"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeliveryBatch:
        return cls(**{k: data[k] for k in ("claim_id", "batch", "channel", "priority", "deliveries")})


@dataclass(frozen=True)
class ClaimSummary:
    batches: list[DeliveryBatch]
    redriven: int = 0  # failed deliveries made pending again (redeliver_failed)
    exhausted: int = 0  # deliveries failed because their sends never finished

    def by_lane(self) -> dict[str, list[dict[str, Any]]]:
        """Descriptors per mapped task: ``urgent`` (any channel), then one list per channel."""
        lanes: dict[str, list[dict[str, Any]]] = {"urgent": [], **{c: [] for c in CHANNELS}}
        for b in self.batches:
            lanes["urgent" if b.priority == "urgent" else b.channel].append(b.to_dict())
        return lanes


def claim(
    conn: psycopg.Connection,
    claim_id: str,
    settings: Settings,
    *,
    redeliver_failed: bool = False,
    channels: list[str] | None = None,
    limit: int | None = None,
) -> ClaimSummary:
    """Claim due deliveries for ``claim_id`` and return its batches, in one transaction.

    Idempotent per run: when the run still holds pending deliveries (a retried claim task), the batches
    they form are returned and nothing new is claimed.
    """
    unknown = sorted(set(channels or ()) - set(CHANNELS))
    if unknown:
        raise ValueError(f"unknown channel(s) {unknown}; herald delivers to {', '.join(CHANNELS)}")
    with conn.transaction():
        held = db.run(conn, "deliveries/run_batches", {"claim_id": claim_id}).fetchall()
        if held:
            log.info("run %s already holds deliveries; returning its %s batches", claim_id, len(held))
            return ClaimSummary(_batches(claim_id, held))
        redriven = 0
        if redeliver_failed:
            redriven = len(db.run(conn, "deliveries/redrive_failed", {"channels": channels}).fetchall())
            log.info("redeliver_failed: %s failed deliveries are pending again", redriven)
        exhausted = db.run(conn, "deliveries/fail_exhausted",
                           {"max_attempts": settings.delivery_max_attempts}).fetchall()
        if exhausted:
            log.warning("failed %s deliveries whose send started %s times without finishing",
                        len(exhausted), settings.delivery_max_attempts)
        rows = db.run(conn, "deliveries/claim_due", {
            "claim_id": claim_id,
            "limit": limit or settings.delivery_max_per_run,
            "batch_size": settings.delivery_batch_size,
            "lease_seconds": settings.delivery_claim_lease_seconds,
            "channels": channels,
        }).fetchall()
    batches = _batches(claim_id, rows)
    log.info("run %s claimed %s deliveries in %s batches", claim_id, sum(b.deliveries for b in batches),
             len(batches))
    return ClaimSummary(batches, redriven, len(exhausted))


def _batches(claim_id: str, rows: list[tuple]) -> list[DeliveryBatch]:
    return [DeliveryBatch(claim_id, batch, channel, priority, n) for batch, priority, channel, n in rows]


def release(conn: psycopg.Connection, claim_id: str, batch: int | None = None) -> int:
    """Release what ``claim_id`` (or one of its batches) holds but did not send; return how many."""
    with conn.transaction():
        released = db.run(conn, "deliveries/release", {"claim_id": claim_id, "batch": batch}).fetchall()
    if released:
        log.info("run %s released %s unsent deliveries", claim_id, len(released))
    return len(released)
