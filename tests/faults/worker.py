"""One herald unit of work in a process of its own, for the fault suite (what a task process does).

    python -m tests.faults.worker batch CLAIM_ID BATCH [--pause-at STAGE --pause-dir DIR]
    python -m tests.faults.worker run CLAIM_ID [--dry-run] [--mode backfill --start ISO --end ISO]
    python -m tests.faults.worker deliver CLAIM_ID BATCH --channel CHANNEL [--pause-at after_send ...]
    python -m tests.faults.worker deliveries CLAIM_ID    (claim, send every batch, release: a whole run)

The database comes from ``DATABASE_URL``, Redis from ``REDIS_URL`` (absent: no Redis, the fallback),
settings from ``HERALD_*`` variables, the channels' Airflow connections from ``AIRFLOW_CONN_*``.
With ``--pause-at``, the batch (or send task) writes ``DIR/reached`` at that stage (see
``processing.Checkpoint``, ``channels.sending.Checkpoint``) and waits for ``DIR/go``, so the test can
strike at the worst
moment: kill this process, terminate its database connection, stop Redis, let the lease run out.
The result is printed as one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import redis

from herald import db, pipeline
from herald.claiming import Batch, ClaimRequest
from herald.config import Settings
from herald.processing import process_batch

#: The application name of the worker's PostgreSQL connection (``pg_stat_activity``), so a test can
#: terminate exactly this backend.
APPLICATION_NAME = "herald-fault-worker"


def _pause(stage: str | None, directory: Path | None):
    if stage is None or directory is None:
        return None

    def checkpoint(reached: str) -> None:
        if reached != stage:
            return
        (directory / "reached").write_text(str(os.getpid()))
        while not (directory / "go").exists():
            time.sleep(0.05)

    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worker")
    parser.add_argument("what", choices=["batch", "run", "deliver", "deliveries"])
    parser.add_argument("claim_id")
    parser.add_argument("batch", nargs="?", type=int, default=0)
    parser.add_argument("--pause-at")
    parser.add_argument("--pause-dir", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--mode", default="manual")
    parser.add_argument("--start")
    parser.add_argument("--end")
    parser.add_argument("--channel", default="webhook")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    redis_url = os.environ.get("REDIS_URL")
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2) if redis_url else None
    with db.connection(os.environ["DATABASE_URL"], autocommit=True, application_name=APPLICATION_NAME) as conn:
        if args.what in ("deliver", "deliveries"):
            print(json.dumps(_deliver(conn, args, settings)))
        elif args.what == "batch":
            batch = Batch(args.claim_id, args.batch, "normal", 0, 0)
            result = process_batch(conn, client, batch, settings, checkpoint=_pause(args.pause_at, args.pause_dir))
            print(json.dumps(result.to_dict()))
        else:
            interval = None
            if args.start:
                interval = (datetime.fromisoformat(args.start), datetime.fromisoformat(args.end))
            request = ClaimRequest(args.claim_id, mode=args.mode, dry_run=args.dry_run, interval=interval)
            summary, _ = pipeline.run_once(conn, client, settings, request)
            print(json.dumps(summary.to_dict()))
    return 0


def _deliver(conn, args: argparse.Namespace, settings: Settings) -> dict:
    """One send task (``deliver``), or a whole notification_delivery run (``deliveries``)."""
    from herald import channels
    from herald.airflow_tasks import sender_for

    if args.what == "deliver":
        batch = channels.DeliveryBatch(args.claim_id, args.batch, args.channel, "normal", 0)
        result = channels.deliver_batch(conn, batch, sender_for(args.channel, settings), settings,
                                        checkpoint=_pause(args.pause_at, args.pause_dir))
        return result.to_dict()
    summary = channels.claim(conn, args.claim_id, settings)
    totals: dict[str, int] = {"batches": len(summary.batches)}
    for batch in summary.batches:
        result = channels.deliver_batch(conn, batch, sender_for(batch.channel, settings), settings)
        for key in ("deliveries", "sent", "retried", "failed", "disabled", "released"):
            totals[key] = totals.get(key, 0) + getattr(result, key)
    totals["released"] = totals.get("released", 0) + channels.release(conn, args.claim_id)
    return totals


if __name__ == "__main__":
    sys.exit(main())
