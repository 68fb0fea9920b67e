"""A whole run: claim, process every batch (urgent first), finalize.

The DAG runs these three steps as separate tasks (the batches as mapped tasks); ``run_once`` chains
them in one process for the urgent lane (one task start), the CLI, the benchmark and the tests.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from herald import claiming, db
from herald.claiming import Batch, ClaimRequest
from herald.config import Settings
from herald.digests import send_digests
from herald.processing import OUTCOMES, BatchResult, process_batch

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    batches: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    released: int = 0
    digests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "batches": self.batches, "counts": self.counts,
                "released": self.released, "digests": self.digests}


def summarise(results: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Counts per outcome and per trigger end over a run's batch results (``BatchResult.to_dict()``)."""
    counts = dict.fromkeys(
        (*OUTCOMES, "triggers", "triggers_done", "triggers_failed", "recipients", "deliveries"), 0)
    for r in results:
        for key in counts:
            counts[key] += int(r.get(key, 0) or 0)
    return counts


def finalize(
    conn: psycopg.Connection,
    settings: Settings,
    claim_id: str,
    results: Iterable[dict[str, Any] | None],
    *,
    dry_run: bool = False,
    digests: bool = True,
) -> RunSummary:
    """Release what the run claimed but did not finish, send due digests, record the run.

    A dry run claimed nothing and sends no digest; only its report in ``herald_runs`` is written.
    ``digests=False`` (the urgent lane) leaves the digest pass to the two-minute run.
    """
    finished = [r for r in results if r]
    summary = RunSummary(claim_id, batches=len(finished), counts=summarise(finished))
    if not dry_run:
        summary.released = claiming.release(conn, claim_id)
    if not dry_run and digests:
        passed = send_digests(conn, settings)
        summary.digests = passed.sent
        summary.counts["digested"] = passed.folded  # batches never digest; this pass does
        summary.counts["deliveries"] += passed.deliveries
    summary.counts["digests_sent"] = summary.digests
    with conn.transaction():
        db.run(conn, "finish_run", {"run_id": claim_id, "counts": Jsonb(summary.counts)})
    log.info("run %s: %s", claim_id, summary.counts)
    return summary


def run_once(
    conn: psycopg.Connection,
    redis_client: redis.Redis | None,
    settings: Settings,
    request: ClaimRequest,
    *,
    digests: bool = True,
    workers: int = 1,
    connect: Callable[[], psycopg.Connection] | None = None,
) -> tuple[RunSummary, list[BatchResult]]:
    """Claim, process every batch, finalize. ``workers`` > 1 (with ``connect``, which opens an autocommit
    connection for each extra worker) processes that many batches at once, as the DAG's mapped tasks run
    side by side: one batch computes while another writes, and the rate-limit locks keep the decisions
    about users they share one at a time."""
    batches: list[Batch] = claiming.claim(conn, request, settings)
    results = _process(conn, redis_client, batches, settings, dry_run=request.dry_run, workers=workers,
                       connect=connect)
    summary = finalize(conn, settings, request.claim_id, [r.to_dict() for r in results], dry_run=request.dry_run,
                       digests=digests)
    return summary, results


def _process(conn: psycopg.Connection, redis_client: redis.Redis | None, batches: list[Batch], settings: Settings,
             *, dry_run: bool, workers: int, connect: Callable[[], psycopg.Connection] | None) -> list[BatchResult]:
    """The batches' results, in claim order (urgent first), ``workers`` batches at a time.

    Side by side, a batch that raises does not stop the others (as with mapped tasks): they all end,
    then the first error is raised. One at a time, the run stops at the failing batch."""
    workers = min(workers, len(batches))
    if workers <= 1 or connect is None:
        return [process_batch(conn, redis_client, b, settings, dry_run=dry_run) for b in batches]
    extra = [connect() for _ in range(workers - 1)]
    idle: queue.SimpleQueue[psycopg.Connection] = queue.SimpleQueue()
    for c in (conn, *extra):
        idle.put(c)

    def one(batch: Batch) -> BatchResult:
        c = idle.get()
        try:
            return process_batch(c, redis_client, batch, settings, dry_run=dry_run)
        finally:
            idle.put(c)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="herald-batch") as pool:
            return list(pool.map(one, batches))
    finally:
        for c in extra:
            c.close()
