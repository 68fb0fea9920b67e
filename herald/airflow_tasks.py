"""What each task of the herald DAGs does, given Airflow's context. The DAG files only wire these.

Connections come from the Airflow connections ``notifications_db`` and ``notifications_redis``
(through the provider hooks) and settings from Variables, read here at run time, never at parse time.
XComs carry batch descriptors and counts, never rows or personal data.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
import redis

from herald import claiming, metrics, pipeline
from herald.claiming import Batch, ClaimRequest
from herald.config import POSTGRES_CONN_ID, REDIS_CONN_ID, SMTP_CONN_ID, Settings
from herald.processing import process_batch

log = logging.getLogger(__name__)

#: Test hook: ``HERALD_FAULT_ONCE=[kill@]<stage>:<marker file>`` makes the first batch attempt that
#: reaches ``stage`` (see ``processing.Checkpoint``; for send tasks ``after_send``, see
#: ``channels.sending.Checkpoint``) raise, or with ``kill@`` SIGKILL its own process;
#: the marker file records that it happened. Shows retries end to end under a real scheduler.
FAULT_ENV = "HERALD_FAULT_ONCE"
REDIS_TIMEOUT_SECONDS = 10.0


@contextmanager
def connections() -> Iterator[tuple[psycopg.Connection, redis.Redis | None]]:
    """The notifications database (autocommit; herald opens its own transactions) and Redis."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=POSTGRES_CONN_ID).get_conn()
    conn.autocommit = True
    client = redis_from_hook(REDIS_TIMEOUT_SECONDS)
    try:
        yield conn, client
    finally:
        conn.close()
        if client is not None:
            client.close()


def redis_from_hook(timeout_seconds: float) -> redis.Redis | redis.RedisCluster | None:
    """The ``notifications_redis`` client with socket timeouts, or None when it is unusable.

    RedisHook sets no timeouts, and a Redis that stops answering must slow a batch down (it falls
    back to PostgreSQL), not hang it.
    """
    from airflow.providers.redis.hooks.redis import RedisHook

    try:
        client = RedisHook(redis_conn_id=REDIS_CONN_ID).get_conn()
    except Exception as exc:  # no connection configured, bad extras: run on PostgreSQL alone
        log.warning("Redis connection %s unusable (%s); running without it", REDIS_CONN_ID, exc)
        return None
    timeouts = {"socket_connect_timeout": timeout_seconds, "socket_timeout": timeout_seconds}
    if isinstance(client, redis.RedisCluster):  # the hook's {"cluster": true}: one pool per node
        client.nodes_manager.connection_kwargs.update(timeouts)
        for node in client.get_nodes():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.connection_kwargs.update(timeouts)
    else:
        for key, value in timeouts.items():
            client.connection_pool.connection_kwargs.setdefault(key, value)
    return client


def claim_id_for(run_id: str, clear_number: int | None) -> str:
    """The claim id of one execution of a DAG run: the run id, plus ``#n`` once the run was cleared.

    A cleared run (an operator's clear, or a backfill that reprocesses an existing run) runs again
    under the same run id; its claims and its ``herald_runs`` record must not be mistaken for the
    earlier execution's.
    """
    return run_id if not clear_number else f"{run_id}#{clear_number}"


def check_conf(conf: dict[str, Any] | None, declared: Iterable[str]) -> None:
    """Refuse a run whose conf has keys the DAG does not declare (``{"dryrun": true}`` must not deliver)."""
    unknown = sorted(set(conf or {}) - set(declared))
    if unknown:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"unknown key(s) in the run's conf: {', '.join(map(repr, unknown))}; "
            f"this DAG takes only {', '.join(sorted(declared))}. Nothing was claimed."
        )


def claim_request(claim_id: str, run_type: str, params: dict[str, Any],
                  interval: tuple[datetime, datetime] | None) -> ClaimRequest:
    """The claim for a DAG run: scheduled, manual (with the trigger form's params) or backfill."""
    mode = {"backfill": "backfill", "backfill_job": "backfill", "manual": "manual"}.get(
        str(run_type).lower().split(".")[-1], "scheduled")
    user_ids = params.get("user_ids") or None
    return ClaimRequest(
        claim_id=claim_id,
        mode=mode,
        dry_run=bool(params.get("dry_run")),
        only_urgent=bool(params.get("only_urgent")),
        user_ids=[int(u) for u in user_ids] if user_ids else None,
        max_triggers=params.get("max_triggers") or None,
        batch_size=params.get("batch_size") or None,
        interval=interval if mode == "backfill" else None,
    )


def claim(claim_id: str, run_type: str, params: dict[str, Any],
          interval: tuple[datetime, datetime] | None) -> dict[str, Any]:
    settings = Settings.from_airflow()
    request = claim_request(claim_id, run_type, params, interval)
    with connections() as (conn, _):
        batches = claiming.claim(conn, request, settings)
    metrics.claimed(batches)
    return {
        "claim_id": claim_id,
        "urgent": [b.to_dict() for b in batches if b.priority == "urgent"],
        "normal": [b.to_dict() for b in batches if b.priority != "urgent"],
    }


def process(batch: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    settings = Settings.from_airflow()
    with connections() as (conn, client):
        result = process_batch(conn, client, Batch.from_dict(batch), settings,
                               dry_run=bool(params.get("dry_run")), checkpoint=_fault_checkpoint())
    metrics.batch_processed(result)
    return result.to_dict()


def finalize(claim_id: str, results: Sequence[Any], params: dict[str, Any]) -> dict[str, Any]:
    settings = Settings.from_airflow()
    # Index by length instead of iterating: iterating Airflow's lazy XCom sequence probes one past the
    # end, which the API server logs as an error ("XCom not found").
    flat = [group[i] for group in results if group for i in range(len(group))]
    flat = [r for r in flat if r]
    with connections() as (conn, _):
        summary = pipeline.finalize(conn, settings, claim_id, flat, dry_run=bool(params.get("dry_run")))
    metrics.run_finished(summary)
    return summary.to_dict()


def urgent_lane(claim_id: str) -> dict[str, Any]:
    """The urgent lane's one task: claim urgent triggers only, process every batch, release, record.

    One task start instead of claim + mapped batches + finalize: each start costs seconds, and urgent
    batches are small. It takes every urgent trigger waiting, including those inserted since its
    wake-up (the listener does not wake the lane again for them while this run has not claimed).
    No digest pass (the two-minute run does it): urgent ones are never held back.
    """
    settings = Settings.from_airflow()
    request = ClaimRequest(claim_id, mode="urgent", only_urgent=True)
    with connections() as (conn, client):
        summary, results = pipeline.run_once(conn, client, settings, request, digests=False)
    for result in results:
        metrics.batch_processed(result)
    metrics.run_finished(summary)
    return summary.to_dict()


# ------------------------------------------------------------------------------ notification_delivery


def sender_for(channel: str, settings: Settings) -> Any:
    """The sender of a channel, with its Airflow connection (read when it first sends)."""
    from herald.channels.apprise import AppriseSender
    from herald.channels.email import EmailSender
    from herald.channels.webhook import WebhookSender

    if channel == "email":
        return EmailSender(SMTP_CONN_ID)
    if channel == "webhook":
        return WebhookSender(settings.delivery_timeout_seconds)
    if channel == "apprise":
        return AppriseSender()
    raise ValueError(f"unknown channel {channel!r}")


def delivery_claim(claim_id: str, params: dict[str, Any]) -> dict[str, Any]:
    from herald import channels

    settings = Settings.from_airflow()
    with connections() as (conn, _):
        summary = channels.claim(conn, claim_id, settings, redeliver_failed=bool(params.get("redeliver_failed")),
                                 channels=params.get("channels") or None,
                                 limit=params.get("max_deliveries") or None)
    metrics.deliveries_claimed(summary)
    return {"claim_id": claim_id, "redriven": summary.redriven, "exhausted": summary.exhausted,
            **summary.by_lane()}


def deliver(batch: dict[str, Any]) -> dict[str, Any]:
    from herald import channels

    settings = Settings.from_airflow()
    descriptor = channels.DeliveryBatch.from_dict(batch)
    with connections() as (conn, _):
        result = channels.deliver_batch(conn, descriptor, sender_for(descriptor.channel, settings), settings,
                                        checkpoint=_fault_checkpoint())
    metrics.deliveries_recorded(result)
    return result.to_dict()


def delivery_finalize(claim_id: str, results: Sequence[Any]) -> dict[str, Any]:
    from herald import channels

    flat = [group[i] for group in results if group for i in range(len(group))]
    flat = [r for r in flat if r]
    with connections() as (conn, _):
        released = channels.release(conn, claim_id)
    totals = {key: sum(int(r.get(key, 0) or 0) for r in flat)
              for key in ("deliveries", "sent", "retried", "failed", "disabled", "released")}
    totals["released"] += released
    log.info("delivery run %s: %s batches, %s", claim_id, len(flat), totals)
    return {"claim_id": claim_id, "batches": len(flat), **totals}


def housekeeping() -> dict[str, int]:
    from herald import housekeeping as hk

    settings = Settings.from_airflow()
    with connections() as (conn, client):
        done = hk.run(conn, client, settings)
    metrics.verified(done["verify_violations"])
    return done


def _fault_checkpoint() -> Any:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    where, marker = spec.split(":", 1)
    action, _, stage = where.rpartition("@")

    def checkpoint(reached: str) -> None:
        if reached != stage:
            return
        try:
            with open(marker, "x") as fh:  # atomic: exactly one attempt is hit
                fh.write(reached)
        except FileExistsError:
            return
        if action == "kill":  # the task process dies on the spot, as under the OOM killer
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at {stage} (test hook {FAULT_ENV})")

    return checkpoint
