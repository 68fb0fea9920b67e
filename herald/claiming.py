"""Claiming a bounded slice of the trigger queue for one run, cut into batch descriptors.

A descriptor names a batch (run id + batch number), never its rows: the mapped task loads its own
triggers, so XComs stay small whatever the backlog.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from herald import db
from herald.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One mapped task's share of a run: the triggers claimed by ``claim_id`` with ``batch`` number."""

    claim_id: str
    batch: int
    priority: str
    triggers: int
    recipients: int

    @property
    def label(self) -> str:
        """What the Airflow UI shows for the mapped task ("urgent · 4,800 users")."""
        return f"{self.priority} · {self.recipients:,} users · {self.triggers:,} triggers"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        return cls(**{k: data[k] for k in ("claim_id", "batch", "priority", "triggers", "recipients")})


@dataclass(frozen=True)
class ClaimRequest:
    claim_id: str
    mode: str = "scheduled"  # scheduled | manual | backfill
    dry_run: bool = False
    only_urgent: bool = False
    user_ids: list[int] | None = None
    max_triggers: int | None = None
    batch_size: int | None = None
    #: Backfill only: re-drive failed / never-processed triggers created in [start, end).
    interval: tuple[datetime, datetime] | None = None


def plan_batches(
    claimed: list[tuple[int, str, int]], batch_size: int, max_batches: int
) -> tuple[list[list[int]], list[str], list[int], list[int]]:
    """Cut ``(trigger_id, priority, recipients)`` into batches of at most ``batch_size`` recipients.

    Urgent triggers first, each priority in id order; a trigger larger than ``batch_size`` gets a batch
    of its own. Returns ``(batches of ids, their priorities, their recipient totals, ids left over)``:
    whatever would need more than ``max_batches`` batches is left for the next run.
    """
    batches: list[list[int]] = []
    priorities: list[str] = []
    sizes: list[int] = []
    leftover: list[int] = []
    ordered = sorted(claimed, key=lambda c: (c[1] != "urgent", c[0]))
    for trigger_id, priority, recipients in ordered:
        cost = max(recipients, 1)
        fits = batches and priorities[-1] == priority and sizes[-1] + cost <= batch_size
        if fits:
            batches[-1].append(trigger_id)
            sizes[-1] += cost
        elif len(batches) < max_batches:
            batches.append([trigger_id])
            priorities.append(priority)
            sizes.append(cost)
        else:
            leftover.append(trigger_id)
    return batches, priorities, sizes, leftover


def claim(conn: psycopg.Connection, request: ClaimRequest, settings: Settings) -> list[Batch]:
    """Claim triggers for ``request.claim_id`` and return its batches, in one transaction.

    Idempotent per run: when the run already holds pending claims (a retried claim task), the
    batches recorded for it are returned again and nothing new is claimed.
    """
    with conn.transaction():
        existing = db.run(conn, "run_claim", {"run_id": request.claim_id}).fetchone()
        if existing and existing[1]:
            log.info("run %s already holds claims; returning its %s recorded batches",
                     request.claim_id, len(existing[0]))
            return [Batch.from_dict(b) for b in existing[0]]

        exhausted = db.run(conn, "fail_exhausted_triggers", {"max_attempts": settings.max_attempts}).fetchall()
        if exhausted:
            log.warning("failed %s triggers that were claimed %s times without finishing",
                        len(exhausted), settings.max_attempts)

        limit = request.max_triggers or settings.max_triggers_per_run
        params = {
            "claim_id": request.claim_id,
            "limit": limit,
            "lease_seconds": settings.claim_lease_seconds,
            "only_urgent": request.only_urgent,
            "user_ids": request.user_ids or None,
        }
        if request.interval is not None:
            params["start"], params["end"] = request.interval
            rows = db.run(conn, "claim_failed_triggers", params).fetchall()
        else:
            rows = db.run(conn, "claim_pending_triggers", params).fetchall()

        # Only well-formed fan-out triggers need an estimate; a malformed one fails alone in its batch.
        fanout = sorted({(r[3], r[4]) for r in rows if r[2] is None and r[3] is not None and r[4] is not None})
        estimates: dict[tuple[str, int], int] = {}
        if fanout:
            est = db.run(
                conn,
                "estimate_recipients",
                {"entity_types": [e[0] for e in fanout], "entity_ids": [e[1] for e in fanout]},
            )
            estimates = {(t, i): n for t, i, n in est}
        claimed = [(r[0], r[1], 1 if r[2] is not None else estimates.get((r[3], r[4]), 0)) for r in rows]

        batch_ids, priorities, sizes, leftover = plan_batches(
            claimed, request.batch_size or settings.batch_size, settings.max_batches_per_run
        )
        if leftover:
            db.run(conn, "release_claims", {"claim_id": request.claim_id, "ids": leftover})
            log.info("left %s claimed triggers for the next run (max %s batches per run)",
                     len(leftover), settings.max_batches_per_run)
        ids = [i for ids in batch_ids for i in ids]
        numbers = [n for n, ids_ in enumerate(batch_ids) for _ in ids_]
        if ids:
            db.run(conn, "assign_claim_batches",
                   {"claim_id": request.claim_id, "ids": ids, "batches": numbers})
        batches = [
            Batch(request.claim_id, n, priorities[n], len(batch_ids[n]), sizes[n]) for n in range(len(batch_ids))
        ]
        db.run(
            conn,
            "start_run",
            {
                "run_id": request.claim_id,
                "mode": request.mode,
                "dry_run": request.dry_run,
                "triggers": len(ids),
                "batches": Jsonb([b.to_dict() for b in batches]),
            },
        )
    log.info("run %s claimed %s triggers in %s batches", request.claim_id, len(ids), len(batches))
    return batches


def release(conn: psycopg.Connection, claim_id: str, ids: list[int] | None = None) -> int:
    """Release what ``claim_id`` holds but did not finish; return how many triggers."""
    with conn.transaction():
        released = db.run(conn, "release_claims", {"claim_id": claim_id, "ids": ids}).fetchall()
    if released:
        log.info("run %s released %s unfinished claims", claim_id, len(released))
    return len(released)
