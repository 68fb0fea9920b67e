"""``herald bench``: the performance targets of DESIGN.md, measured on this machine in one run.

For each workload scale (W1 and its multiples), in a fresh database on the discovered PostgreSQL, with
the same deterministic data (seeded once, then reset to the seeded state before each measurement) and a
fresh Redis namespace each time:

- **COPY floor**: PostgreSQL ``COPY ... FROM STDIN`` of exactly the notification rows the core produced
  (same columns, pre-serialised in COPY text format, so only the server's work and the transfer count)
  into the empty ``notifications`` table with all its indexes, commit included;
- **processing core**: ``pipeline.run_once`` over every batch, no Airflow, ``--core-workers`` batches at a
  time (2 by default, on connections of their own, as the DAG's mapped tasks), with its SQL statements and
  Redis commands counted (``herald.instrument``), the longest server-side time of any of its Redis
  commands (``redis_max_call_ms``, from ``SLOWLOG``) and its peak Python memory measured (tracemalloc,
  in a separate untimed run so that tracing does not slow the timed one);
- **reference**: the sequential per-row processor (``herald.reference.run_reference``), by default on
  W1 only, and a check that it produced exactly the core's notifications (the bench fails otherwise);
- **delivery** (with ``--email-every N``: one user in N has an email channel, so the outbox holds an
  email delivery per notification of theirs): the email deliveries of the core's run (at most
  ``--delivery-sample``), sent through ``herald.channels`` and the SMTP provider's hook on one SMTP
  connection to a local ``aiosmtpd`` sink, and recorded: messages per second per SMTP connection;
- with ``--dag``: a whole ``notification_batch`` DAG run under a real scheduler (LocalExecutor,
  PostgreSQL metadata database), timed from the run's start to its end.

Timings use ``time.perf_counter``; ``--repeat N`` keeps the best of N. Never a timed test: the
integration test runs this at a tiny size and checks the figures' shape, not the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis

from herald import claiming, db, pipeline, services, verify, workload
from herald.claiming import ClaimRequest
from herald.config import DAG_ID, POOL_NORMAL, POOL_URGENT, PROJECT_ROOT, Settings
from herald.instrument import CountingRedis, SlowestRedisCall, StatementCounter
from herald.processes import free_port, stop_process_group
from herald.processing import process_batch

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "herald_bench"
#: Airflow pools the DAG run needs (slots as in ``airflow_settings.yaml``).
BENCH_POOLS = ((POOL_NORMAL, 8, "herald bench: normal notification batches"),
               (POOL_URGENT, 4, "herald bench: urgent notification batches"))
COPY_CHUNK = 1 << 20
#: The Redis client name of the core's runs, by which SLOWLOG entries are told apart.
BENCH_REDIS_CLIENT = "herald-bench-core"

#: The targets of DESIGN.md "Performance targets" (with the raised ones), as functions of the value and the
#: scale. ``scales``: the scales a target is stated for (None: all). Cross-scale figures (``..._over_w1``)
#: exist only when scale 1 ran in the same command.
TARGETS: dict[str, dict[str, Any]] = {
    "core_over_copy": {"text": "<= 2.0 (<= 2.5 from 100x)", "ok": lambda v, k: v <= (2.5 if k >= 100 else 2.0),
                       "scales": None},
    "core_per_notification_over_w1": {"text": "<= 1.25", "ok": lambda v, k: v <= 1.25, "scales": None},
    "core_sql_statements": {"text": "< 100 on W1", "ok": lambda v, k: v < 100, "scales": {1}},
    "reference_over_core": {"text": ">= 20", "ok": lambda v, k: v >= 20, "scales": None},
    "redis_max_call_ms": {"text": "<= 50", "ok": lambda v, k: v <= 50, "scales": None},
    "dag_run_seconds": {"text": "< 60 on W1, < 120 at any scale", "ok": lambda v, k: v < (60 if k == 1 else 120),
                        "scales": None},
}


class BenchError(RuntimeError):
    """The benchmark could not measure what it should (or the results disagree)."""


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure the processing core against the PostgreSQL COPY floor and the sequential reference "
        "on workload W1 and its multiples (DESIGN.md, 'Performance targets'). Uses a fresh database "
        f"({DEFAULT_DATABASE}) on the discovered PostgreSQL, dropped at the end, and its own Redis keys."
    )
    parser.add_argument("--users", type=int, default=workload.WorkloadSpec.users,
                        help="users of the base workload W1 (default: %(default)s)")
    parser.add_argument("--triggers", type=int, default=workload.WorkloadSpec.triggers,
                        help="pending triggers of the base workload W1 (default: %(default)s)")
    parser.add_argument("--scale", type=int, nargs="+", default=[1], metavar="K",
                        help="workload multiples to run, e.g. --scale 1 10 (default: 1)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default: %(default)s)")
    parser.add_argument("--email-every", type=int, default=0, metavar="N",
                        help="give one user in N an email channel (2: half the users), so the core writes "
                             "email deliveries with the notifications and the delivery figure is measured "
                             "(default: 0, no channels)")
    parser.add_argument("--delivery-sample", type=int, default=25_000, metavar="N",
                        help="email deliveries sent for the delivery figure, at most (default: %(default)s)")
    parser.add_argument("--core-workers", type=int, default=2, metavar="N",
                        help="batches the core processes at a time, each on its own connection, as the DAG's "
                             "mapped tasks do (default: %(default)s; 1 for the sequential figure)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each timed measurement N times and keep the best (default: 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--skip-reference", action="store_true",
                        help="do not run the sequential reference processor")
    parser.add_argument("--reference-all-scales", action="store_true",
                        help="run the reference on every scale (default: only on scale 1; it is slow)")
    parser.add_argument("--dag", action="store_true",
                        help="also time a whole notification_batch DAG run under a real scheduler")
    parser.add_argument("--dag-timeout", type=float, default=900, metavar="SECONDS",
                        help="give up on a DAG run after this long (default: %(default)s)")
    parser.add_argument("--database", default=DEFAULT_DATABASE,
                        help="name of the scratch database, dropped and re-created (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch databases (and the Airflow home of --dag) at the end")
    parser.add_argument("--check-targets", action="store_true",
                        help="exit with status 3 when a target is not met")
    from herald import latency

    latency.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if (args.repeat < 1 or any(k < 1 for k in args.scale) or args.users < 1 or args.triggers < 1
            or args.core_workers < 1):
        print("herald bench: --repeat, --scale, --users, --triggers and --core-workers must be positive",
              file=sys.stderr)
        return 2
    if args.latency:
        return _latency(args)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"herald bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if not report["ok"]:
        print("herald bench: FAILED: " + "; ".join(report["problems"]), file=sys.stderr)
        return 1
    if args.check_targets and report["targets_not_met"]:
        print("herald bench: targets not met: " + ", ".join(report["targets_not_met"]), file=sys.stderr)
        return 3
    return 0


def _latency(args: argparse.Namespace) -> int:
    from herald import latency

    try:
        report = latency.run(args)
    except BenchError as exc:
        print(f"herald bench --latency: FAILED: {exc}", file=sys.stderr)
        return 1
    print(latency.format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if args.check_targets and not all(report["targets"].values()):
        return 3
    return 0


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement of every scale; return the report (see ``--json``)."""
    base = workload.WorkloadSpec(users=args.users, triggers=args.triggers, seed=args.seed,
                                 email_every=max(args.email_every, 0))
    scales = list(dict.fromkeys(args.scale))  # in the order given, without repeats
    runs: list[dict[str, Any]] = []
    problems: list[str] = []
    with services.ensure_services() as found:
        if not found.redis_url:
            raise BenchError("no Redis found: set REDIS_URL")
        machine = _machine_info(found)
        _progress(f"PostgreSQL {machine['postgresql']} ({found.database_source}), "
                  f"Redis {machine['redis']} ({found.redis_source}), {machine['cores']} cores")
        airflow: AirflowBench | None = None
        bench_url = ""
        try:
            if args.dag:
                airflow = AirflowBench(found, args.database, timeout=args.dag_timeout, keep=args.keep)
                airflow.check_ready()
            for scale in scales:
                bench_url = services.create_database(found.database_url, args.database, drop_first=True)
                with db.connection(bench_url) as conn:
                    db.migrate(conn)
                with_reference = not args.skip_reference and (scale == 1 or args.reference_all_scales)
                result = ScaleBench(bench_url, found.redis_url, base, scale, args.repeat,
                                    delivery_sample=args.delivery_sample, core_workers=args.core_workers).run(
                    with_reference=with_reference,
                    reference_note=("--skip-reference" if args.skip_reference else
                                    "reference runs on scale 1 only (--reference-all-scales to change)"),
                    airflow=airflow,
                )
                problems += [f"{result['label']}: {p}" for p in result["problems"]]
                runs.append(result)
        finally:
            if airflow is not None:
                airflow.stop()
            if not args.keep:
                services.drop_database(found.database_url, args.database)
            elif bench_url:
                _progress(f"kept database {services.redact_url(bench_url)}")
    _cross_scale(runs)
    first = runs[0]
    not_met = [f"{r['label']} {name}" for r in runs for name, t in r["targets"].items() if t["met"] is False]
    return {
        **{k: v for k, v in first.items() if k != "problems"},
        "runs": runs,
        "machine": machine,
        "targets_not_met": not_met,
        "problems": problems,
        "ok": not problems,
    }


def _machine_info(found: services.Services) -> dict[str, Any]:
    with db.connection(found.database_url, autocommit=True) as conn:
        settings = dict(db.run(conn, "bench_server_settings").fetchall())
    pg_version = settings.pop("server_version", "?")
    client = redis.Redis.from_url(found.redis_url)  # type: ignore[arg-type]
    try:
        info = client.info("server")
    finally:
        client.close()
    redis_version = str(info.get("redis_version"))
    if info.get("valkey_version"):
        redis_version = f"{redis_version} (valkey {info['valkey_version']})"
    memory = None
    with contextlib.suppress(Exception):
        import psutil

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "postgresql_settings": settings,
        "postgresql_source": found.database_source,
        "redis": redis_version,
        "redis_source": found.redis_source,
    }


@contextlib.contextmanager
def _fresh_namespace(redis_url: str, kind: str) -> Iterator[Settings]:
    """Default settings with a Redis namespace of their own; its keys are deleted afterwards."""
    settings = dataclasses.replace(Settings(), cache_namespace=f"herald-bench-{kind}-{uuid.uuid4().hex[:12]}:v1")
    try:
        yield settings
    finally:
        _delete_namespace(redis_url, settings.cache_namespace)


def _delete_namespace(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
    except redis.RedisError as exc:
        log.warning("could not delete the bench keys %s:* (%s)", namespace, exc)
    finally:
        client.close()


def _label(base: workload.WorkloadSpec, scale: int) -> str:
    """``W1``, ``10xW1`` for the design's workload; ``x1``, ``x10`` for another base size."""
    name = "W1" if dataclasses.replace(base, seed=1, email_every=0) == workload.WorkloadSpec() else ""
    if not name:
        return f"x{scale}"
    return name if scale == 1 else f"{scale}x{name}"


def _best(times: list[float]) -> float:
    return round(min(times), 4)


class ScaleBench:
    """The measurements of one scale, on one scratch database."""

    def __init__(self, url: str, redis_url: str, base: workload.WorkloadSpec, scale: int, repeat: int,
                 delivery_sample: int = 25_000, core_workers: int = 2) -> None:
        spec = base.scaled(scale)
        self.core_workers = core_workers
        self.delivery_sample = delivery_sample
        self.url = url
        self.redis_url = redis_url
        self.spec = spec
        self.scale = scale
        self.repeat = repeat
        self.label = _label(base, scale)
        self.seeded = False
        # The session that loads the data; it also keeps the core's notifications (a temporary table).
        self.admin = db.connect(url, autocommit=True)

    def _progress(self, message: str) -> None:
        _progress(f"{self.label}: {message}")

    def reset(self) -> None:
        """The seeded state again (identical ids), then a checkpoint so that none falls in a timing.

        Seeded once; after that only what a measurement wrote is undone (seeding 100x W1 takes minutes,
        undoing a run seconds), and the triggers table vacuumed so each run finds it alike."""
        if not self.seeded:
            workload.seed(self.admin, self.spec, reset=True)
            self.seeded = True
        else:
            db.run(self.admin, "bench_reset_outputs")
            db.run(self.admin, "bench_reset_pending_triggers", {"done": self.spec.done_triggers})
            db.run(self.admin, "bench_vacuum_triggers")
        self.checkpoint()

    def checkpoint(self) -> None:
        """Write dirty buffers out now, so that no checkpoint falls inside a timing."""
        with contextlib.suppress(psycopg.Error):  # needs superuser or pg_checkpoint; a nicety only
            db.run(self.admin, "bench_checkpoint")

    def fingerprint(self) -> dict[str, Any]:
        count, digests, md5 = db.run(self.admin, "bench_notifications_fingerprint").fetchone()
        return {"notifications": count, "digests": digests, "md5": md5}

    def compare(self) -> dict[str, Any]:
        missing, extra, missing_ex, extra_ex = db.run(self.admin, "bench_compare_expected").fetchone()
        return {"same": missing == 0 and extra == 0, "missing": missing, "extra": extra,
                "missing_examples": missing_ex, "extra_examples": extra_ex}

    # ------------------------------------------------------------------------------------ the core

    def run_core(self, settings: Settings) -> dict[str, Any]:
        """``run_once`` until nothing is left to claim; counts statements and Redis commands.

        ``core_workers`` batches at a time, as the DAG's mapped tasks run side by side."""
        counter = StatementCounter()
        client = CountingRedis.from_url(self.redis_url, client_name=BENCH_REDIS_CLIENT)
        summaries: list[pipeline.RunSummary] = []
        slowest = SlowestRedisCall(self.redis_url, BENCH_REDIS_CLIENT)
        try:
            with slowest, counter.connect(self.url, autocommit=True) as conn:
                started = time.perf_counter()
                for _ in range(10_000):
                    summary, _results = pipeline.run_once(
                        conn, client, settings, ClaimRequest(f"bench-{uuid.uuid4().hex[:12]}"),
                        workers=self.core_workers, connect=lambda: counter.connect(self.url, autocommit=True))
                    summaries.append(summary)
                    if summary.batches == 0 or not self._claimable():
                        break
                seconds = time.perf_counter() - started
        finally:
            client.close()
        counts = pipeline.summarise(s.counts for s in summaries)
        counts["digests_sent"] = sum(s.digests for s in summaries)
        return {
            "seconds": seconds,
            "statements": counter.statements,
            "redis_commands": client.commands,
            "redis_round_trips": client.round_trips,
            "redis_max_call_ms": slowest.max_ms,
            "runs": len(summaries),
            "batches": sum(s.batches for s in summaries),
            "counts": counts,
        }

    def run_traced(self, settings: Settings) -> dict[str, float]:
        """An untimed run under tracemalloc, step by step as the DAG's tasks take it (claim, each batch,
        finalize): the peak Python memory of the claim and of the largest batch, each above what was held
        before it."""
        client = redis.Redis.from_url(self.redis_url)
        claim_peak = batch_peak = 0
        tracemalloc.start()
        try:
            with db.connection(self.url, autocommit=True) as conn:
                for _ in range(10_000):
                    request = ClaimRequest(f"bench-{uuid.uuid4().hex[:12]}")
                    held = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                    batches = claiming.claim(conn, request, settings)
                    claim_peak = max(claim_peak, tracemalloc.get_traced_memory()[1] - held)
                    results = []
                    for batch in batches:
                        held = tracemalloc.get_traced_memory()[0]
                        tracemalloc.reset_peak()
                        results.append(process_batch(conn, client, batch, settings).to_dict())
                        batch_peak = max(batch_peak, tracemalloc.get_traced_memory()[1] - held)
                    pipeline.finalize(conn, settings, request.claim_id, results)
                    if not batches or not self._claimable():
                        break
        finally:
            tracemalloc.stop()
            client.close()
        return {"claim_peak_mb": round(claim_peak / 2**20, 3), "batch_peak_mb": round(batch_peak / 2**20, 3)}

    def check_guarantees(self, problems: list[str], what: str) -> dict[str, Any]:
        """``herald verify`` over what ``what`` wrote (every check of the guarantees); a violation is a
        problem of the bench."""
        started = time.perf_counter()
        report = verify.verify(self.admin, Settings())
        self._progress(f"herald verify after {what}: {'clean' if report.ok else 'VIOLATIONS'} "
                       f"({time.perf_counter() - started:.1f} s)")
        if not report.ok:
            problems.append(f"herald verify after {what}:\n{report.describe()}")
        return {"ok": report.ok, "counts": report.counts}

    def _claimable(self) -> bool:
        return bool(db.run(self.admin, "bench_claimable_triggers").fetchone()[0])

    # ------------------------------------------------------------------------------ the delivery

    def run_delivery(self) -> dict[str, Any]:
        """Send (and record) the outbox's email deliveries to a local SMTP sink, one SMTP connection at a time
        (one per batch: the urgent ones, then the normal ones)."""
        import tempfile

        os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="herald-bench-airflow-home-"))
        from herald import channels
        from herald.channels.email import EmailSender
        from herald.channels.smtp_sink import SmtpSink
        from herald.config import SMTP_CONN_ID

        env_name = f"AIRFLOW_CONN_{SMTP_CONN_ID.upper()}"
        previous = os.environ.get(env_name)
        settings = dataclasses.replace(Settings(), delivery_batch_size=1_000_000, delivery_max_per_run=10_000_000)
        with SmtpSink(keep_messages=False) as sink:
            os.environ[env_name] = sink.connection_uri()
            try:
                with db.connection(self.url, autocommit=True) as conn:
                    summary = channels.claim(conn, f"bench-delivery-{uuid.uuid4().hex[:8]}", settings,
                                             channels=["email"], limit=self.delivery_sample)
                    sender = EmailSender()
                    sent = seconds = send_seconds = 0.0
                    for batch in summary.batches:
                        result = channels.deliver_batch(conn, batch, sender, settings)
                        sent += result.sent
                        seconds += result.duration_seconds
                        send_seconds += result.send_seconds
            finally:
                if previous is None:
                    os.environ.pop(env_name, None)
                else:
                    os.environ[env_name] = previous
            received = sink.count
        claimed = sum(b.deliveries for b in summary.batches)
        problem = None
        if not (claimed and sent == claimed == received):
            problem = (f"delivery: {claimed:,} email deliveries claimed, {int(sent):,} recorded sent, "
                       f"{received:,} received by the SMTP sink")
        # One connection at a time (a login per batch: urgent, then normal), so the rate over the whole
        # time is the rate of one connection.
        return {
            "delivery_messages": int(sent),
            "delivery_seconds": round(seconds, 4),
            "delivery_send_seconds": round(send_seconds, 4),
            "delivery_smtp_connections": sender.connections,
            "delivery_messages_per_second_per_connection": round(sent / seconds, 1) if seconds else None,
            "delivery_problem": problem,
        }

    # ------------------------------------------------------------------------------ the COPY floor

    def export_rows(self) -> bytes:
        """The notification rows now in the table, in COPY text format."""
        data = bytearray()
        with self.admin.cursor().copy(db.sql("bench_export_notifications")) as copy:
            for chunk in copy:
                data += chunk
        return bytes(data)

    def run_copy(self, rows: bytes) -> float:
        db.run(self.admin, "bench_truncate_notifications")
        self.checkpoint()
        view = memoryview(rows)
        with db.connection(self.url) as conn:
            started = time.perf_counter()
            with conn.cursor().copy(db.sql("bench_copy_notifications")) as copy:
                for offset in range(0, len(view), COPY_CHUNK):
                    copy.write(view[offset:offset + COPY_CHUNK])
            conn.commit()
            return time.perf_counter() - started

    # ------------------------------------------------------------------------------- the reference

    def run_reference(self, settings: Settings) -> dict[str, Any]:
        try:
            from herald.reference import run_reference
        except ImportError as exc:
            raise BenchError(f"the reference processor is not available ({exc}); use --skip-reference") from exc
        counter = StatementCounter()
        with counter.connect(self.url, autocommit=True) as conn:
            started = time.perf_counter()
            summary = run_reference(conn, settings)
            seconds = time.perf_counter() - started
        return {"seconds": seconds, "statements": counter.statements, "summary": summary}

    # ------------------------------------------------------------------------------------- all

    def run(self, *, with_reference: bool, reference_note: str, airflow: AirflowBench | None) -> dict[str, Any]:
        spec = self.spec
        problems: list[str] = []
        self._progress(f"{spec.users:,} users, {spec.triggers:,} pending triggers")
        try:
            # 1. An untimed core run under tracemalloc: peak memory, and the notifications all other
            #    measurements are compared with (kept in a temporary table) and COPY again.
            self.reset()
            with _fresh_namespace(self.redis_url, "core") as settings:
                traced = self.run_traced(settings)
            expected = self.fingerprint()
            if not expected["notifications"]:
                raise BenchError(f"{self.label}: the processing core produced no notifications")
            db.run(self.admin, "bench_snapshot_expected")
            rows = self.export_rows()
            self._progress(f"core produced {expected['notifications']:,} notifications (traced peaks: claim "
                           f"{traced['claim_peak_mb']} MB, largest batch {traced['batch_peak_mb']} MB)")

            # 2. The processing core, timed.
            core_times: list[float] = []
            core: dict[str, Any] = {}
            for i in range(self.repeat):
                self.reset()
                with _fresh_namespace(self.redis_url, "core") as settings:
                    core = self.run_core(settings)
                core_times.append(core["seconds"])
                again = self.fingerprint()
                if again["md5"] != expected["md5"]:
                    problems.append(f"core run {i + 1} produced different notifications than the first "
                                    f"({again['notifications']:,} vs {expected['notifications']:,})")
                self._progress(f"core run {i + 1}/{self.repeat}: {core['seconds']:.3f} s, "
                               f"{core['statements']} SQL statements, {core['redis_commands']:,} Redis commands "
                               f"in {core['redis_round_trips']} round trips")
            verified = {"core": self.check_guarantees(problems, "the core run")}

            # 2b. The email deliveries the last core run wrote, to a local SMTP sink on one connection.
            delivery: dict[str, Any] | None = None
            if spec.email_every:
                delivery = self.run_delivery()
                self._progress(f"delivery: {delivery['delivery_messages']:,} emails in "
                               f"{delivery['delivery_seconds']:.3f} s on {delivery['delivery_smtp_connections']} "
                               f"SMTP connection(s): {delivery['delivery_messages_per_second_per_connection']:,} "
                               "messages/s per connection")
                if delivery["delivery_problem"]:
                    problems.append(delivery["delivery_problem"])

            # 3. The COPY floor: the same rows, into the same table with its indexes.
            copy_times: list[float] = []
            for i in range(self.repeat):
                self.reset()
                copy_times.append(self.run_copy(rows))
                copied = self.fingerprint()
                if copied["md5"] != expected["md5"]:
                    problems.append("the COPY floor loaded different rows than the core produced")
                self._progress(f"COPY floor {i + 1}/{self.repeat}: {copy_times[-1]:.3f} s "
                               f"({len(rows) / 2**20:.1f} MB)")

            # 4. The sequential reference, on the same data.
            reference: dict[str, Any] | None = None
            reference_times: list[float] = []
            comparison: dict[str, Any] | None = None
            if with_reference:
                for i in range(self.repeat):
                    self.reset()
                    self._progress(f"reference run {i + 1}/{self.repeat} (sequential, may take a while)")
                    with _fresh_namespace(self.redis_url, "reference") as settings:
                        reference = self.run_reference(settings)
                    reference_times.append(reference["seconds"])
                    comparison = self.compare()
                    self._progress(f"reference run {i + 1}/{self.repeat}: {reference['seconds']:.3f} s, "
                                   f"{reference['statements']:,} SQL statements, same notifications: "
                                   f"{comparison['same']}")
                    if not comparison["same"]:
                        problems.append(
                            f"the reference and the core produced different notifications: "
                            f"{comparison['missing']:,} of the core's missing, {comparison['extra']:,} extra "
                            f"(examples missing {json.dumps(comparison['missing_examples'])}, "
                            f"extra {json.dumps(comparison['extra_examples'])})")
                        break
            else:
                self._progress(f"reference skipped: {reference_note}")

            # 5. A whole DAG run under a real scheduler.
            dag: dict[str, Any] | None = None
            if airflow is not None:
                self.reset()
                dag = airflow.run_dag(self.label, self.url)
                dag["comparison"] = self.compare()
                dag["same_notifications"] = dag["comparison"]["same"]
                self._progress(f"DAG run {dag['state']} in {dag['dag_run_seconds']} s, same notifications: "
                               f"{dag['same_notifications']}")
                if dag["state"] != "success":
                    problems.append(f"the DAG run ended {dag['state']} (logs in {dag['airflow_home']})")
                elif not dag["same_notifications"]:
                    problems.append(f"the DAG run produced different notifications than the core: "
                                    f"{dag['comparison']['missing']:,} missing, {dag['comparison']['extra']:,} extra")
                verified["dag"] = self.check_guarantees(problems, "the DAG run")
        finally:
            self.admin.close()

        copy_s = _best(copy_times)
        core_s = _best(core_times)
        ref_s = _best(reference_times) if reference_times else None
        result: dict[str, Any] = {
            "scale": self.scale,
            "label": self.label,
            "workload": dataclasses.asdict(spec),
            "notifications": expected["notifications"],
            "digests": expected["digests"],
            "notifications_md5": expected["md5"],
            "outcomes": core["counts"],
            "core_runs": core["runs"],
            "core_workers": self.core_workers,
            "batches": core["batches"],
            "copy_floor_seconds": copy_s,
            "copy_floor_mb": round(len(rows) / 2**20, 2),
            "core_seconds": core_s,
            "reference_seconds": ref_s,
            "core_over_copy": round(core_s / copy_s, 2) if copy_s else None,
            "reference_over_core": round(ref_s / core_s, 1) if ref_s is not None and core_s else None,
            "core_sql_statements": core["statements"],
            "reference_sql_statements": reference["statements"] if reference else None,
            "core_redis_commands": core["redis_commands"],
            "core_redis_round_trips": core["redis_round_trips"],
            "redis_max_call_ms": core["redis_max_call_ms"],
            "core_us_per_notification": round(core_s / expected["notifications"] * 1e6, 3),
            "batch_peak_mb": traced["batch_peak_mb"],
            "claim_peak_mb": traced["claim_peak_mb"],
            "core_deliveries": core["counts"].get("deliveries", 0),
            **(delivery or {}),
            "reference_same_notifications": comparison["same"] if comparison else None,
            "reference_skipped": None if with_reference else reference_note,
            "reference_summary": reference["summary"] if reference else None,
            "timings": {"copy_floor_seconds": [round(t, 4) for t in copy_times],
                        "core_seconds": [round(t, 4) for t in core_times],
                        "reference_seconds": [round(t, 4) for t in reference_times]},
            "verify": verified,
            "problems": problems,
        }
        if comparison and not comparison["same"]:
            result["reference_comparison"] = comparison
        if dag is not None:
            result["dag_run_seconds"] = dag["dag_run_seconds"]
            result["dag"] = dag
        result["targets"] = _targets(result)
        return result


def _cross_scale(runs: list[dict[str, Any]]) -> None:
    """Each run's per-notification cost (and the COPY floor's) relative to W1's, when scale 1 ran too, and
    its largest batch's peak memory relative to the next smaller scale's."""
    w1 = next((r for r in runs if r["scale"] == 1), None)
    by_scale = sorted(runs, key=lambda r: r["scale"])
    for r in runs:
        smaller = [x for x in by_scale if x["scale"] < r["scale"]]
        prev = smaller[-1] if smaller else None
        r["batch_peak_mb_over_previous_scale"] = (
            round(r["batch_peak_mb"] / prev["batch_peak_mb"], 2) if prev and prev["batch_peak_mb"] else None)
        if w1 is None or r is w1:
            r["core_per_notification_over_w1"] = r["copy_per_notification_over_w1"] = None
        else:
            r["core_per_notification_over_w1"] = round(
                r["core_us_per_notification"] / w1["core_us_per_notification"], 2)
            r["copy_per_notification_over_w1"] = round(
                (r["copy_floor_seconds"] / r["notifications"]) / (w1["copy_floor_seconds"] / w1["notifications"]), 2)
        r["targets"] = _targets(r)


def _targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, target in TARGETS.items():
        value = result.get(name)
        applies = target["scales"] is None or result["scale"] in target["scales"]
        met = bool(target["ok"](value, result["scale"])) if value is not None and applies else None
        out[name] = {"target": target["text"], "value": value, "met": met}
    return out


# ------------------------------------------------------------------------------------------- report


def format_report(report: dict[str, Any]) -> str:
    runs = report["runs"]
    m = report["machine"]
    head = (f"herald bench: PostgreSQL {m['postgresql']}, Redis {m['redis']}, {m['cores']} cores, "
            f"Python {m['python']}")

    def seconds(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    def count(v: Any) -> str:
        return "-" if v is None else f"{v:,}"

    def ratio(v: Any) -> str:
        return "-" if v is None else f"{v:g}"

    def status(r: dict[str, Any], name: str, text: str) -> str:
        met = r["targets"].get(name, {}).get("met")
        return text if met is None else f"{text} ({'met' if met else 'NOT MET'})"

    rows: list[tuple[str, Callable[[dict[str, Any]], str], str]] = [
        ("users / pending triggers", lambda r: f"{r['workload']['users']:,} / {r['workload']['triggers']:,}", ""),
        ("users with an email channel", lambda r: count(r["workload"]["users"] // r["workload"]["email_every"]
                                                        if r["workload"].get("email_every") else 0), ""),
        ("notifications", lambda r: count(r["notifications"]), ""),
        ("batches (core workers)", lambda r: f"{r['batches']:,} ({r['core_workers']})", ""),
        ("copy_floor_seconds", lambda r: seconds(r["copy_floor_seconds"]), ""),
        ("core_seconds", lambda r: seconds(r["core_seconds"]), ""),
        ("reference_seconds", lambda r: seconds(r["reference_seconds"]) if r["reference_seconds"] is not None
         else "skipped", ""),
        ("core / copy", lambda r: status(r, "core_over_copy", ratio(r["core_over_copy"])),
         TARGETS["core_over_copy"]["text"]),
        ("reference / core", lambda r: status(r, "reference_over_core", ratio(r["reference_over_core"])),
         TARGETS["reference_over_core"]["text"]),
        ("core_sql_statements", lambda r: status(r, "core_sql_statements", count(r["core_sql_statements"])),
         TARGETS["core_sql_statements"]["text"]),
        ("reference_sql_statements", lambda r: count(r["reference_sql_statements"]), ""),
        ("core_redis_commands (round trips)",
         lambda r: f"{r['core_redis_commands']:,} ({r['core_redis_round_trips']:,})", ""),
        ("core us per notification", lambda r: ratio(r["core_us_per_notification"]), ""),
        ("  relative to W1", lambda r: status(r, "core_per_notification_over_w1",
                                              ratio(r.get("core_per_notification_over_w1"))),
         TARGETS["core_per_notification_over_w1"]["text"]),
        ("  COPY floor per row, relative to W1", lambda r: ratio(r.get("copy_per_notification_over_w1")), ""),
        ("redis_max_call_ms (SLOWLOG)", lambda r: status(r, "redis_max_call_ms", ratio(r["redis_max_call_ms"])),
         TARGETS["redis_max_call_ms"]["text"]),
        ("batch_peak_mb (tracemalloc)", lambda r: ratio(r["batch_peak_mb"]), ""),
        ("  relative to the previous scale", lambda r: ratio(r.get("batch_peak_mb_over_previous_scale")),
         "bounded by the batch size"),
        ("claim_peak_mb (tracemalloc)", lambda r: ratio(r["claim_peak_mb"]), ""),
        ("core deliveries (outbox)", lambda r: count(r.get("core_deliveries")), ""),
        ("email deliveries sent (bench)", lambda r: count(r.get("delivery_messages")), ""),
        ("delivery msgs/s per SMTP connection",
         lambda r: ratio(r.get("delivery_messages_per_second_per_connection")), ""),
        ("herald verify (core; DAG)", lambda r: "; ".join(
            "clean" if v["ok"] else "VIOLATIONS" for v in r["verify"].values()), "clean"),
        ("reference = core notifications", lambda r: {None: "-", True: "yes", False: "NO"}[
            r["reference_same_notifications"]], "identical"),
    ]
    if any("dag" in r for r in runs):
        rows.append(("dag_run_seconds", lambda r: status(r, "dag_run_seconds", seconds(r.get("dag_run_seconds"))),
                     TARGETS["dag_run_seconds"]["text"]))
    header = ["", *[f"{r['label']}" for r in runs], "target"]
    table = [header] + [[label, *[fn(r) for r in runs], target] for label, fn, target in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [head, ""]
    for i, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
        cells.append(row[-1].ljust(widths[-1]))
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = sorted({r["reference_skipped"] for r in runs if r["reference_skipped"]})
    for note in notes:
        lines.append(f"reference skipped on {', '.join(r['label'] for r in runs if r['reference_skipped'] == note)}: "
                     f"{note}")
    lines.append(f"best of {len(runs[0]['timings']['core_seconds'])} run(s) per timing; COPY floor = COPY FROM "
                 "STDIN of the core's rows (pre-serialised) into notifications with its indexes, commit included")
    if report["targets_not_met"]:
        lines.append("targets not met: " + ", ".join(report["targets_not_met"]))
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the DAG


class AirflowBench:
    """A throw-away Airflow (scheduler, dag-processor, api-server; PostgreSQL metadata DB).

    ``executor="local"``: the LocalExecutor (a triggerer with ``triggerer=True``). ``"celery"``: the
    processes of ``herald up --executor celery`` (``herald.services.topology``: a triggerer and an urgent
    and a default Celery worker too, Redis as the broker under a key prefix of the bench's own)."""

    def __init__(self, found: services.Services, database: str, *, timeout: float, keep: bool,
                 extra_env: dict[str, str] | None = None, triggerer: bool = False, executor: str = "local") -> None:
        if executor not in ("local", "celery"):
            raise BenchError(f"unknown executor {executor!r}: local or celery")
        self.executor = executor
        self.celery_prefix = f"herald-bench-{uuid.uuid4().hex[:12]}:celery:"
        self.found = found
        self.extra_env = extra_env or {}
        self.triggerer = triggerer
        self.meta_db = f"{database}_airflow"
        self.bench_db = database
        self.timeout = timeout
        self.keep = keep
        self.home: Path | None = None
        self.env: dict[str, str] = {}
        self.meta_url = ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.namespace = f"herald-bench-dag-{uuid.uuid4().hex[:12]}:v1"
        self.unpaused = False
        bin_dir = Path(sys.executable).parent
        self.airflow = str(bin_dir / "airflow") if (bin_dir / "airflow").exists() else shutil.which("airflow")

    def check_ready(self) -> None:
        dag_file = PROJECT_ROOT / "dags" / f"{DAG_ID}.py"
        if not dag_file.exists():
            raise BenchError(f"--dag: {dag_file} does not exist")
        if not self.airflow:
            raise BenchError("--dag: no `airflow` executable found")
        if "://" not in self.found.database_url:
            raise BenchError("--dag needs DATABASE_URL in URL form (postgresql://...)")

    # --------------------------------------------------------------------------------- processes

    def _airflow(self, *args: str, timeout: float = 300) -> str:
        assert self.airflow
        proc = subprocess.run([self.airflow, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BenchError(f"`airflow {' '.join(args)}` failed ({proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-3000:]}")
        return proc.stdout

    def _spawn(self, name: str, *args: str) -> None:
        assert self.airflow and self.home
        logfile = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([self.airflow, *args], env=self.env, stdout=logfile,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        logfile.close()

    def _start_celery(self, bench_url: str, port: int, base: dict[str, str]) -> None:
        """The processes of ``herald up --executor celery`` (but the bench's own AIRFLOW_HOME, ports and
        broker key prefix), each in a process group of its own."""
        from herald.services import topology

        assert self.home
        found = services.Services(bench_url, self.found.redis_url, "env", "env")
        plan = topology.build("celery", found=found, metadata_url=self.meta_url, airflow_home=self.home,
                              api_port=port, base=base | {"HERALD_CELERY_KEY_PREFIX": self.celery_prefix})
        self.env = plan.env
        self._airflow("db", "migrate", timeout=600)
        for name, slots, description in BENCH_POOLS:
            self._airflow("pools", "set", name, str(slots), description)
        for component in plan.components:
            self._spawn(component.name, *component.argv[1:])
        for worker in ("worker-urgent", "worker-default"):
            self._wait(lambda w=worker: " ready." in self._tail(w, 100_000), f"Celery {worker}", 180)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"airflow {name} exited ({proc.returncode}); last lines of its log:\n"
                                 f"{self._tail(name)}")

    def _tail(self, name: str, chars: int = 3000) -> str:
        assert self.home
        with contextlib.suppress(OSError):
            return (self.home / f"{name}.log").read_text(errors="replace")[-chars:]
        return ""

    def start(self, bench_url: str) -> None:
        started = time.perf_counter()
        self.home = Path(tempfile.mkdtemp(prefix="herald-bench-airflow-"))
        meta = services.create_database(self.found.database_url, self.meta_db, drop_first=True)
        self.meta_url = meta
        scheme, rest = meta.split("://", 1)
        port = free_port()
        conns = services.environment(services.Services(bench_url, self.found.redis_url, "env", "env"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(conns)
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg://{rest}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            # Only the run this bench triggers: no scheduled run racing it for the same triggers.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # Every process must share these: the scheduler signs the workers' Execution API tokens.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW_VAR_HERALD_CACHE_NAMESPACE": self.namespace,
            # Log servers bind all interfaces on fixed ports by default: one of our own each.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        })
        env.update(self.extra_env)
        self.env = env
        _progress(f"Airflow ({self.executor}): home {self.home}, metadata DB {services.redact_url(meta)} "
                  f"({scheme}); migrating")
        if self.executor == "celery":
            self._start_celery(bench_url, port, {k: v for k, v in env.items()
                                                 if k not in ("AIRFLOW__CORE__EXECUTOR",) and "LOG_SERVER" not in k})
        else:
            self._airflow("db", "migrate", timeout=600)
            for name, slots, description in BENCH_POOLS:
                self._airflow("pools", "set", name, str(slots), description)
            self._spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
            self._spawn("scheduler", "scheduler")
            self._spawn("dag-processor", "dag-processor")
            if self.triggerer:
                self._spawn("triggerer", "triggerer")
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{port}/api/v2/monitor/health"), "the API server", 180)
        self._wait(self._dag_serialized, f"DAG {DAG_ID} to be parsed", 180)
        _progress(f"Airflow ready in {time.perf_counter() - started:.1f} s")

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"--dag: timed out waiting for {what}; logs in {self.home}")
            time.sleep(0.5)

    def _meta(self, name: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with db.connection(self.meta_url, autocommit=True) as conn:
            return db.run(conn, name, params).fetchall()

    def _dag_serialized(self, dag_id: str = DAG_ID) -> bool:
        try:
            errors = self._meta("bench_airflow_import_errors")
            rows = self._meta("bench_airflow_dag", {"dag_id": dag_id})
        except psycopg.errors.UndefinedTable:
            return False
        if errors:
            raise BenchError("--dag: DAG import errors:\n" + "\n".join(f"{f}:\n{s}" for f, s in errors))
        return bool(rows and rows[0][1])

    def wait_serialized(self, dag_id: str) -> None:
        self._wait(lambda: self._dag_serialized(dag_id), f"DAG {dag_id} to be parsed", 180)

    def unpause(self, dag_id: str) -> None:
        self._airflow("dags", "unpause", dag_id)

    def wait_running(self, dag_id: str, timeout: float = 120) -> None:
        self._wait(lambda: bool(self._meta("bench_airflow_running", {"dag_id": dag_id})),
                   f"a run of {dag_id} to start", timeout)

    # ------------------------------------------------------------------------------------- a run

    def run_dag(self, label: str, bench_url: str) -> dict[str, Any]:
        if not self.procs:
            self.start(bench_url)
        if not self.unpaused:
            self._airflow("dags", "unpause", DAG_ID)
            self.unpaused = True
        run_id = f"herald_bench_{label}_{uuid.uuid4().hex[:8]}"
        try:
            _progress(f"{label}: triggering {DAG_ID} run {run_id}")
            triggered = time.perf_counter()
            self._airflow("dags", "trigger", DAG_ID, "--run-id", run_id)
            deadline = time.monotonic() + self.timeout
            while True:
                rows = self._meta("bench_airflow_run", {"dag_id": DAG_ID, "run_id": run_id})
                if rows and rows[0][0] in ("success", "failed"):
                    break
                self._check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"--dag: run {run_id} not finished after {self.timeout:.0f} s "
                                     f"(state {rows[0][0] if rows else 'missing'}); logs in {self.home}")
                time.sleep(0.5)
            observed = time.perf_counter() - triggered
            state, queued_at, start_date, end_date, run_type = rows[0]
            tasks = self._meta("bench_airflow_tasks", {"dag_id": DAG_ID, "run_id": run_id})
        finally:
            if self.found.redis_url:
                _delete_namespace(self.found.redis_url, self.namespace)
        task_rows = [{"task_id": t[0], "map_index": t[1], "state": t[2], "pool": t[3], "try_number": t[4],
                      "duration": round(t[7], 3) if t[7] is not None else None} for t in tasks]
        return {
            "run_id": run_id,
            "run_type": run_type,
            "state": state,
            "dag_run_seconds": round((end_date - start_date).total_seconds(), 3),
            "queued_to_end_seconds": round((end_date - queued_at).total_seconds(), 3) if queued_at else None,
            "trigger_to_observed_end_seconds": round(observed, 3),
            "task_instances": len(task_rows),
            "task_states": _tally(t["state"] for t in task_rows),
            "tasks": task_rows,
            "airflow_home": str(self.home),
        }

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop_process_group(proc)
        self.procs.clear()
        if self.keep:
            if self.home:
                _progress(f"kept Airflow home {self.home} and database {self.meta_db}")
            return
        with contextlib.suppress(psycopg.Error):
            if self.meta_url:
                services.drop_database(self.found.database_url, self.meta_db)
        if self.executor == "celery" and self.found.redis_url:
            _delete_namespace(self.found.redis_url, self.celery_prefix.rstrip(":"))
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)


def _tally(values: Iterator[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own local server
            return 200 <= response.status < 300
    except OSError:
        return False


