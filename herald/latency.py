"""``herald bench --latency``: urgent INSERT to notification, measured under a real scheduler and triggerer.

A throw-away Airflow (the bench's: api-server, scheduler, dag-processor and triggerer, LocalExecutor,
PostgreSQL metadata DB, default scheduler settings; with ``--latency-executor celery`` the processes of
``herald up --executor celery``, urgent and default Celery workers included) runs the urgent lane
(``notification_urgent``) on a fresh W1-shaped database. Urgent triggers are inserted one at a time at
random moments; a poller records when each one's notification row first appears (every 50 ms).
Latency = that moment minus the moment the INSERT's commit returned, both on this machine's clock.

- **idle**: nothing else runs;
- **under load**: while ``notification_batch`` works through ``--latency-load-scale`` x W1 normal
  triggers (the urgent triggers are inserted only while normal ones are left).

Also reported: the urgent lane's runs, and the share of them that claimed nothing (a wake-up too many).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from typing import Any

from psycopg.types.json import Jsonb

from herald import db, services, workload
from herald.bench import AirflowBench, BenchError, _progress
from herald.config import DAG_ID, URGENT_DAG_ID

POLL_SECONDS = 0.05
DELIVERY_TIMEOUT = 180.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency", action="store_true",
                        help="measure the urgent lane instead: INSERT to notification, idle and under load")
    parser.add_argument("--latency-triggers", type=int, default=30, metavar="N",
                        help="urgent triggers per phase of --latency (default: %(default)s)")
    parser.add_argument("--latency-load-scale", type=int, default=10, metavar="K",
                        help="the normal run of the loaded phase processes K x W1 (default: %(default)s)")
    parser.add_argument("--latency-executor", choices=("local", "celery"), default="local",
                        help="the LocalExecutor, or the Celery topology of `herald up --executor celery` with "
                             "its urgent and default workers (default: %(default)s)")


class _Watch:
    """Inserts urgent triggers and records when each one's notification appears."""

    def __init__(self, url: str, users: int, seed: int) -> None:
        self.url = url
        self.users = users
        self.rng = random.Random(seed)
        self.committed: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def insert(self) -> int:
        with db.connection(self.url, autocommit=True) as conn:
            trigger_id = db.run(conn, "bench_insert_urgent", {
                "user_id": self.rng.randint(1, self.users), "payload": Jsonb({"message": "a new login"}),
            }).fetchone()[0]
        self.committed[trigger_id] = time.monotonic()
        return trigger_id

    def _poll(self) -> None:
        with db.connection(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                waiting = [t for t in self.committed if t not in self.seen]
                if waiting:
                    now = time.monotonic()
                    for (trigger_id,) in db.run(conn, "bench_delivered_triggers", {"ids": waiting}):
                        self.seen[trigger_id] = now
                time.sleep(POLL_SECONDS)

    def wait_all(self, ids: list[int], timeout: float = DELIVERY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while any(t not in self.seen for t in ids):
            if time.monotonic() > deadline:
                missing = [t for t in ids if t not in self.seen]
                raise BenchError(f"--latency: {len(missing)} urgent triggers not delivered after {timeout:.0f} s")
            time.sleep(POLL_SECONDS)

    def latencies(self, ids: list[int]) -> list[float]:
        return [self.seen[t] - self.committed[t] for t in ids]

    def close(self) -> None:
        self._stop.set()
        self._poller.join(5)


def _figures(prefix: str, values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return {f"{prefix}_p50_seconds": round(statistics.median(ordered), 3),
            f"{prefix}_p95_seconds": round(p95, 3),
            f"{prefix}_max_seconds": round(ordered[-1], 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    database = f"{args.database}_latency"
    base = workload.WorkloadSpec(users=args.users, triggers=args.triggers, seed=args.seed)
    with services.ensure_services() as found:
        url = services.create_database(found.database_url, database, drop_first=True)
        with db.connection(url, autocommit=True) as conn:
            db.migrate(conn)
            conn.autocommit = True
            _progress(workload.seed(conn, base.scaled(args.latency_load_scale)))
            db.run(conn, "bench_park_pending_triggers")  # the loaded phase's work, out of the way until then
        airflow = AirflowBench(found, database, timeout=args.dag_timeout, keep=args.keep, triggerer=True,
                               extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True"},  # asset runs need it
                               executor=args.latency_executor)
        watch = _Watch(url, base.scaled(args.latency_load_scale).users, args.seed)
        try:
            airflow.check_ready()
            airflow.start(url)
            airflow.wait_serialized(URGENT_DAG_ID)
            airflow.unpause(URGENT_DAG_ID)
            warm = watch.insert()  # the first wake-up pays for registering the watcher
            watch.wait_all([warm])
            _progress(f"urgent lane warm ({watch.latencies([warm])[0]:.2f} s for the first trigger)")

            idle = _phase(watch, args.latency_triggers, lambda: True, gaps=(0.5, 3.0))
            _progress("idle: " + ", ".join(f"{v:.2f}" for v in sorted(watch.latencies(idle))))

            with db.connection(url, autocommit=True) as conn:
                db.run(conn, "bench_unpark_pending_triggers")
                # A manual run, and whatever scheduled run the unpaused DAG makes: the phase lasts while
                # normal triggers are left (max_active_runs=1, so they run one after the other).
                normal = threading.Thread(target=lambda: airflow.run_dag("latency-load", url), daemon=True)
                normal.start()
                airflow.wait_running(DAG_ID)
                loaded = _phase(watch, args.latency_triggers,
                                lambda: db.run(conn, "bench_pending_normal").fetchone()[0] > 0, gaps=(0.2, 1.0))
                normal.join(args.dag_timeout)
                _progress("under load: " + ", ".join(f"{v:.2f}" for v in sorted(watch.latencies(loaded))))
                runs, empty = db.run(conn, "bench_urgent_runs").fetchone()
                load = db.run(conn, "bench_run_counts").fetchone()
        finally:
            watch.close()
            airflow.stop()
            if not args.keep:
                services.drop_database(found.database_url, database)
    report = {
        "executor": {"local": "LocalExecutor", "celery": "CeleryExecutor"}[args.latency_executor],
        "urgent_triggers_idle": len(idle),
        "urgent_triggers_under_load": len(loaded),
        **_figures("urgent_latency", watch.latencies(idle)),
        **_figures("urgent_latency_under_load", watch.latencies(loaded)),
        "under_load_normal_runs": {"runs": load[0], "triggers": load[1], "delivered": load[2],
                                   "seconds": round(float(load[3] or 0), 1)},
        "under_load_scale": args.latency_load_scale,
        "urgent_runs": runs,
        "urgent_runs_empty": empty,
        "urgent_runs_empty_share": round(empty / runs, 3) if runs else None,
    }
    report["targets"] = {
        "idle p95 < 3 s": report["urgent_latency_p95_seconds"] < 3,
        "idle max < 6 s": report["urgent_latency_max_seconds"] < 6,
        "under load p95 < 10 s": report["urgent_latency_under_load_p95_seconds"] < 10,
        "empty runs <= 10%": report["urgent_runs_empty_share"] is not None and report["urgent_runs_empty_share"] <= 0.1,
    }
    return report


def _phase(watch: _Watch, n: int, going: Any, gaps: tuple[float, float]) -> list[int]:
    """Insert ``n`` urgent triggers at random moments (``gaps`` seconds apart) while ``going()``; wait."""
    ids: list[int] = []
    for _ in range(n):
        if not going():
            break
        time.sleep(watch.rng.uniform(*gaps))
        ids.append(watch.insert())
    watch.wait_all(ids)
    if not ids:
        raise BenchError("--latency: the loaded phase ended before any urgent trigger was inserted")
    return ids


def format_report(report: dict[str, Any]) -> str:
    lines = [f"urgent lane latency ({report['executor']}), INSERT commit to notification row:"]
    for phase, key in (("idle", "urgent_latency"), (f"under {report['under_load_scale']}x W1 load",
                                                    "urgent_latency_under_load")):
        lines.append(f"  {phase:24} p50 {report[f'{key}_p50_seconds']:.2f} s  p95 {report[f'{key}_p95_seconds']:.2f} s"
                     f"  max {report[f'{key}_max_seconds']:.2f} s")
    lines.append(f"  urgent runs: {report['urgent_runs']}, of which claimed nothing: {report['urgent_runs_empty']}"
                 f" ({report['urgent_runs_empty_share']:.0%})")
    lines += [f"  target {name}: {'met' if ok else 'NOT MET'}" for name, ok in report["targets"].items()]
    return "\n".join(lines)

