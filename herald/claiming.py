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


#: At most this many batches of one run go to "suspects": triggers whose processing started before and
#: never finished (``attempts > 0``). Each gets a batch of its own, so a poison trigger that crashes
#: its batch takes no innocent trigger down with it; the rest wait for later runs.
MAX_SUSPECT_BATCHES = 16


@dataclass(frozen=True)
class Claimed:
    """A claimed trigger as the planner sees it."""

    id: int
    priority: str
    recipients: int  # estimated at claim time (1 for a direct trigger)
    suspect: bool = False  # an earlier processing attempt did not finish


def plan_batches(
    claimed: list[Claimed], batch_size: int, max_batches: int, max_suspects: int = MAX_SUSPECT_BATCHES
) -> tuple[list[list[int]], list[str], list[int], list[int]]:
    """Cut claimed triggers into batches of at most ``batch_size`` recipients.

    Urgent triggers first, each priority in id order; a trigger larger than ``batch_size`` gets a batch
    of its own, and so does each suspect (at most ``max_suspects`` of them). Returns ``(batches of ids,
    their priorities, their recipient totals, ids left over)``: whatever would need more than
    ``max_batches`` batches (or more suspect batches) is left for the next run.
    """
    batches: list[list[int]] = []
    priorities: list[str] = []
    sizes: list[int] = []
    leftover: list[int] = []
    suspects = 0
    open_batch: dict[str, int] = {}  # priority -> index of the batch that still takes triggers
    for c in sorted(claimed, key=lambda c: (c.priority != "urgent", c.id)):
        cost = max(c.recipients, 1)
        current = open_batch.get(c.priority)
        if not c.suspect and current is not None and sizes[current] + cost <= batch_size:
            batches[current].append(c.id)
            sizes[current] += cost
        elif len(batches) < max_batches and (not c.suspect or suspects < max_suspects):
            batches.append([c.id])
            priorities.append(c.priority)
            sizes.append(cost)
            if c.suspect:  # later triggers start a new batch: batches stay in id order
                suspects += 1
                open_batch.pop(c.priority, None)
            else:
                open_batch[c.priority] = len(batches) - 1
        else:
            leftover.append(c.id)
    return batches, priorities, sizes, leftover


def claim(conn: psycopg.Connection, request: ClaimRequest, settings: Settings) -> list[Batch]:
    """Claim triggers for ``request.claim_id`` and return its batches, in one transaction.

    Idempotent per run: when the run already holds pending claims (a retried claim task), the
    batches recorded for it are returned again and nothing new is claimed.

    A dry run takes the same claim in a transaction that is rolled back, so it changes no trigger; it
    records its batches (with their trigger ids) in its own ``herald_runs`` row, its report.
    """
    if request.dry_run:
        return _claim_dry(conn, request, settings)
    with conn.transaction():
        existing = db.run(conn, "run_claim", {"run_id": request.claim_id}).fetchone()
        if existing and existing[1]:
            log.info("run %s already holds claims; returning its %s recorded batches",
                     request.claim_id, len(existing[0]))
            return [Batch.from_dict(b) for b in existing[0]]

        exhausted = db.run(conn, "fail_exhausted_triggers", {"max_attempts": settings.max_attempts}).fetchall()
        if exhausted:
            log.warning("failed %s triggers whose processing started %s times without finishing",
                        len(exhausted), settings.max_attempts)
        batches, batch_ids = _take(conn, request, settings)
        _record(conn, request, batches)
    log.info("run %s claimed %s triggers in %s batches", request.claim_id,
             sum(len(ids) for ids in batch_ids), len(batches))
    return batches


def _claim_dry(conn: psycopg.Connection, request: ClaimRequest, settings: Settings) -> list[Batch]:
    batches: list[Batch] = []
    batch_ids: list[list[int]] = []
    with conn.transaction():
        batches, batch_ids = _take(conn, request, settings)
        raise psycopg.Rollback()  # a dry run changes no trigger
    with conn.transaction():
        _record(conn, request, batches, batch_ids)
    log.info("dry run %s would claim %s triggers in %s batches (nothing claimed)", request.claim_id,
             sum(len(ids) for ids in batch_ids), len(batches))
    return batches


def _take(conn: psycopg.Connection, request: ClaimRequest, settings: Settings) -> tuple[list[Batch], list[list[int]]]:
    """Claim, estimate, plan batches, release what does not fit, number the rest (in the caller's transaction)."""
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
    claimed = [
        Claimed(r[0], "urgent" if r[1] == "urgent" else "normal",
                1 if r[2] is not None else estimates.get((r[3], r[4]), 0), suspect=r[5] > 0)
        for r in rows
    ]
    batch_ids, priorities, sizes, leftover = plan_batches(
        claimed, request.batch_size or settings.batch_size, settings.max_batches_per_run
    )
    if leftover:
        db.run(conn, "release_claims", {"claim_id": request.claim_id, "ids": leftover})
        log.info("left %s claimed triggers for the next run (max %s batches per run, %s for suspects)",
                 len(leftover), settings.max_batches_per_run, MAX_SUSPECT_BATCHES)
    ids = [i for ids in batch_ids for i in ids]
    numbers = [n for n, ids_ in enumerate(batch_ids) for _ in ids_]
    if ids:
        db.run(conn, "assign_claim_batches", {"claim_id": request.claim_id, "ids": ids, "batches": numbers})
    batches = [
        Batch(request.claim_id, n, priorities[n], len(batch_ids[n]), sizes[n]) for n in range(len(batch_ids))
    ]
    return batches, batch_ids


def _record(conn: psycopg.Connection, request: ClaimRequest, batches: list[Batch],
            batch_ids: list[list[int]] | None = None) -> None:
    """The run's row in ``herald_runs``: its batches (a dry run's with their trigger ids)."""
    recorded = [b.to_dict() for b in batches]
    if batch_ids is not None:
        for entry, ids in zip(recorded, batch_ids, strict=True):
            entry["trigger_ids"] = ids
    db.run(
        conn,
        "start_run",
        {
            "run_id": request.claim_id,
            "mode": request.mode,
            "dry_run": request.dry_run,
            "triggers": sum(b.triggers for b in batches),
            "batches": Jsonb(recorded),
        },
    )


def release(conn: psycopg.Connection, claim_id: str, ids: list[int] | None = None) -> int:
    """Release what ``claim_id`` holds but did not finish; return how many triggers."""
    with conn.transaction():
        released = db.run(conn, "release_claims", {"claim_id": claim_id, "ids": ids}).fetchall()
    if released:
        log.info("run %s released %s unfinished claims", claim_id, len(released))
    return len(released)
