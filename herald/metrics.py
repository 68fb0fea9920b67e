"""Counters and timers through Airflow's own metrics (StatsD or OpenTelemetry, as Airflow is set up).

All names start with ``herald.`` (see the README's metrics table); a StatsD server sees them under
Airflow's ``[metrics] statsd_prefix`` (``airflow.herald.notifications.delivered``). Counters are sent by
every batch and run, zeros included. With metrics switched off in Airflow these calls do nothing.
``HERALD_STATSD=host:port`` switches them on under ``herald up`` (:mod:`herald.observability`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from herald.config import METRICS_PREFIX

if TYPE_CHECKING:
    from herald.channels.claiming import ClaimSummary
    from herald.channels.sending import DeliveryResult
    from herald.claiming import Batch
    from herald.pipeline import RunSummary
    from herald.processing import BatchResult

log = logging.getLogger(__name__)

OUTCOME_COUNTERS = ("delivered", "skipped_preference", "rate_limited", "failed")


def _stats():
    from airflow.sdk.observability import stats

    return stats


def _name(*parts: str) -> str:
    return ".".join((METRICS_PREFIX, *parts))


def claimed(batches: Sequence[Batch]) -> None:
    stats = _stats()
    stats.incr(_name("triggers", "claimed"), sum(b.triggers for b in batches))
    stats.gauge(_name("run", "batches"), len(batches))


def batch_processed(result: BatchResult) -> None:
    if result.dry_run:
        return
    stats = _stats()
    for outcome in OUTCOME_COUNTERS:
        stats.incr(_name("notifications", outcome), getattr(result, outcome))
    stats.incr(_name("triggers", "done"), result.triggers_done)
    stats.incr(_name("triggers", "failed"), result.triggers_failed)
    stats.timing(_name("batch", "duration"), result.duration_seconds * 1000)
    # Sent by every batch (0 or 1), so the counter exists from the first run and a dashboard can tell
    # "no fallback" from "no data".
    stats.incr(_name("redis", "fallbacks"), 0 if result.redis_available else 1)


def run_finished(summary: RunSummary) -> None:
    stats = _stats()
    stats.incr(_name("digests", "sent"), summary.digests)
    stats.incr(_name("claims", "released"), summary.released)


def verified(violations: int) -> None:
    """What housekeeping's ``herald verify`` found (0 on a healthy system)."""
    _stats().gauge(_name("verify", "violations"), violations)


def deliveries_claimed(summary: ClaimSummary) -> None:
    _stats().incr(_name("deliveries", "claimed"), sum(b.deliveries for b in summary.batches))


def deliveries_recorded(result: DeliveryResult) -> None:
    """``herald.deliveries.{sent,retried,failed,disabled}.<channel>`` for one send task."""
    stats = _stats()
    for kind in ("sent", "retried", "failed", "disabled"):
        stats.incr(_name("deliveries", kind, result.channel), getattr(result, kind))
    stats.timing(_name("deliveries", "batch", "duration"), result.duration_seconds * 1000)
