"""The notification queue at a glance: backlog, throughput, outcomes, claims, runs, cache.

Used by ``herald stats`` and by the Airflow plugin (``plugins/herald_plugin.py``: ``/herald/api/stats``
and the "Notifications" page). Everything here is cheap on large tables:

- the backlog, the oldest pending ages and the claims come from one pass over the *pending* triggers
  (``stats_pending_backlog.sql``, through the partial index ``notification_triggers_pending_idx``);
- throughput and outcomes come from the run records, **not** from ``notifications`` or
  ``notification_outcomes``: each finished run stores its counts in ``herald_runs.counts``, so "delivered
  in the last 24 hours" is a sum over a few hundred ``herald_runs`` rows (``herald_runs_started_idx``)
  instead of a scan of a large inbox table (whose only time index starts with ``user_id``). A window
  counts the runs that *finished* in it; dry runs are left out;
- the cache hit ratio comes from two Redis counters the pipeline increments; it is the ratio since the
  counters were created (a new ``cache_namespace`` starts them again). Redis being down only makes it
  ``None``.

Nothing returned carries a payload or any user data: ids, types, counts, durations and reasons.

``queue_stats`` returns (times are ISO 8601 UTC strings, ages and durations seconds)::

    {"generated_at": "...Z",
     "backlog": {"normal": 37, "urgent": 5, "total": 42},
     "oldest_pending_age_seconds": {"normal": 312.5, "urgent": null},
     "urgent_latency_last_hour": {"triggers": 12, "p50_seconds": 1.4, "p95_seconds": 2.1},
     "claims": {"held": 3, "expired": 0},
     "throughput": {"last_hour" | "last_24h": {"triggers_processed", "triggers_done", "triggers_failed",
                                               "notifications_delivered", "digests_sent"}},
     "outcomes_last_hour": {"delivered", "skipped_preference", "rate_limited", "digested", "failed"},
     "recent_runs": [{"run_id", "mode", "dry_run", "started_at", "finished_at", "running",
                      "duration_seconds", "triggers", "counts": {...}}],          # newest first, 10
     "cache": {"available": true, "hits": 900, "misses": 100, "hit_ratio": 0.9},
     "series": {"bucket_seconds": 3600,  # 24 points, oldest first
                "points": [{"start", "runs", "triggers_processed", "delivered", "backlog"}]},
     "deliveries": {"channels": {"email" | "webhook" | "apprise": {
                        "pending", "due", "retrying", "oldest_pending_age_seconds",
                        "last_24h": {"pending", "sent", "failed", "disabled"}}},
                    "failures": [{"channel", "status", "reason", "count", "latest"}]}}   # top 10

``deliveries`` is the outbox of channel deliveries (email, webhooks, Apprise): the pending ones now
(through the partial index on pending), what became of those written in the last 24 hours (BRIN on
``created_at``), and the most frequent reasons of failed and disabled ones (partial index).

A point's ``backlog`` is what the last run finished in that hour recorded as ``counts.backlog`` (pending
triggers it saw), or null; the last point always holds the current backlog.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from herald import db
from herald.config import Settings

log = logging.getLogger(__name__)

#: Per-recipient outcomes, in the order the overview shows them (``herald.processing.OUTCOMES``).
OUTCOME_KINDS = ("delivered", "skipped_preference", "rate_limited", "digested", "failed")
SHORT_WINDOW_SECONDS = 3600
LONG_WINDOW_SECONDS = 24 * 3600
#: The chart: 24 buckets of one hour, the last one being the current (partial) hour.
SERIES_BUCKET_SECONDS = 3600
SERIES_BUCKETS = 24
#: A run that took longer than this is left out of the windows (it lets the queries use
#: ``herald_runs_started_idx``; such a run's claims would long have expired anyway).
MAX_RUN_SECONDS = 6 * 3600
RECENT_RUNS = 10
FAILED_LIMIT_MAX = 500
DELIVERY_CHANNELS = ("email", "webhook", "apprise")
DELIVERY_STATUSES = ("pending", "sent", "failed", "disabled")
DELIVERY_FAILURE_REASONS = 10


# ------------------------------------------------------------------------------------------- queries


def _query(conn: Any, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of ``include/sql/<name>.sql`` as dicts, whatever the connection's row factory.

    Uses the DB-API cursor only, so a psycopg 3 connection (``herald.db``, ``PostgresHook`` here) and a
    psycopg2 one (``PostgresHook`` under SQLAlchemy 1.4) both work.
    """
    cur = conn.cursor()
    try:
        cur.execute(db.sql(name), dict(params or {}))
        names = [d[0] for d in cur.description]
        return [
            dict(row) if isinstance(row, Mapping) else dict(zip(names, row, strict=True))
            for row in cur.fetchall()
        ]
    finally:
        cur.close()


def _number(value: Any) -> int | float | None:
    """A JSON-able number: a whole Decimal or float becomes an int."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@contextmanager
def _read_transaction(conn: Any) -> Iterator[None]:
    """One transaction around the reads, so ``now()`` is the same in every query; nothing is written."""
    transaction = getattr(conn, "transaction", None)
    if transaction is not None:  # psycopg 3: BEGIN ... COMMIT, or a savepoint inside the caller's
        with transaction():
            yield
        return
    try:  # psycopg2 (PostgresHook under SQLAlchemy 1.4): end the implicit transaction
        yield
    finally:
        if not conn.autocommit:
            conn.rollback()


def _backlog(conn: Any) -> dict[str, Any]:
    row = _query(conn, "stats_pending_backlog")[0]
    normal, urgent = int(row["pending_normal"]), int(row["pending_urgent"])
    return {
        "backlog": {"normal": normal, "urgent": urgent, "total": normal + urgent},
        "oldest_pending_age_seconds": {
            "normal": _seconds(row["oldest_normal_age_seconds"]),
            "urgent": _seconds(row["oldest_urgent_age_seconds"]),
        },
        "claims": {"held": int(row["claims_held"]), "expired": int(row["claims_expired"])},
    }


def _run_totals(conn: Any) -> dict[str, Any]:
    rows = _query(
        conn,
        "stats_run_totals",
        {
            "short_window_seconds": SHORT_WINDOW_SECONDS,
            "long_window_seconds": LONG_WINDOW_SECONDS,
            "max_run_seconds": MAX_RUN_SECONDS,
        },
    )
    short = {r["key"]: _number(r["short_total"]) or 0 for r in rows}
    long = {r["key"]: _number(r["long_total"]) or 0 for r in rows}

    def window(totals: dict[str, Any]) -> dict[str, int]:
        return {
            "triggers_processed": totals.get("triggers_done", 0) + totals.get("triggers_failed", 0),
            "triggers_done": totals.get("triggers_done", 0),
            "triggers_failed": totals.get("triggers_failed", 0),
            "notifications_delivered": totals.get("delivered", 0),
            "digests_sent": totals.get("digests_sent", 0),
        }

    return {
        "throughput": {"last_hour": window(short), "last_24h": window(long)},
        "outcomes_last_hour": {kind: short.get(kind, 0) for kind in OUTCOME_KINDS},
    }


def _series(conn: Any, current_backlog: int) -> dict[str, Any]:
    rows = _query(
        conn,
        "stats_throughput_series",
        {
            "bucket_seconds": SERIES_BUCKET_SECONDS,
            "buckets": SERIES_BUCKETS,
            "max_run_seconds": MAX_RUN_SECONDS,
        },
    )
    points = [
        {
            "start": _iso(r["bucket_start"]),
            "runs": int(r["runs"]),
            "triggers_processed": _number(r["triggers_processed"]),
            "delivered": _number(r["delivered"]),
            "backlog": _number(r["backlog"]),
        }
        for r in rows
    ]
    if points:
        # The current bucket shows the backlog as it is now, whatever the runs recorded.
        points[-1]["backlog"] = current_backlog
    return {"bucket_seconds": SERIES_BUCKET_SECONDS, "points": points}


def _recent_runs(conn: Any, limit: int = RECENT_RUNS) -> list[dict[str, Any]]:
    return [
        {
            "run_id": r["run_id"],
            "mode": r["mode"],
            "dry_run": bool(r["dry_run"]),
            "started_at": _iso(r["started_at"]),
            "finished_at": _iso(r["finished_at"]),
            "running": r["finished_at"] is None,
            "duration_seconds": _seconds(r["duration_seconds"]),
            "triggers": int(r["triggers"]),
            "counts": {k: v for k, v in (r["counts"] or {}).items() if _is_number(v)},
        }
        for r in _query(conn, "stats_recent_runs", {"limit": limit})
    ]


def _urgent_latency(conn: Any) -> dict[str, Any]:
    (row,) = _query(conn, "stats_urgent_latency", {"window_seconds": SHORT_WINDOW_SECONDS})
    return {"triggers": int(row["n"]), "p50_seconds": _seconds(row["p50"]), "p95_seconds": _seconds(row["p95"])}


def _deliveries(conn: Any) -> dict[str, Any]:
    channels: dict[str, dict[str, Any]] = {
        c: {"pending": 0, "due": 0, "retrying": 0, "oldest_pending_age_seconds": None,
            "last_24h": dict.fromkeys(DELIVERY_STATUSES, 0)}
        for c in DELIVERY_CHANNELS
    }
    for r in _query(conn, "stats_deliveries_pending"):
        entry = channels.setdefault(r["channel"], {"last_24h": dict.fromkeys(DELIVERY_STATUSES, 0)})
        entry.update(pending=int(r["pending"]), due=int(r["due"]), retrying=int(r["retrying"]),
                     oldest_pending_age_seconds=_seconds(r["oldest_age_seconds"]))
    for r in _query(conn, "stats_deliveries_recent", {"window_seconds": LONG_WINDOW_SECONDS}):
        channels.setdefault(r["channel"], {"pending": 0, "due": 0, "retrying": 0, "oldest_pending_age_seconds": None,
                                           "last_24h": dict.fromkeys(DELIVERY_STATUSES, 0)})
        channels[r["channel"]]["last_24h"][r["status"]] = int(r["n"])
    failures = [
        {"channel": r["channel"], "status": r["status"], "reason": r["reason"], "count": int(r["n"]),
         "latest": _iso(r["latest"])}
        for r in _query(conn, "stats_delivery_failures", {"limit": DELIVERY_FAILURE_REASONS})
    ]
    return {"channels": channels, "failures": failures}


def cache_stats(redis_client: Any | None, settings: Settings) -> dict[str, Any]:
    """Hit/miss counters and the hit ratio; all ``None`` when Redis is missing or unreachable."""
    result: dict[str, Any] = {"available": False, "hits": None, "misses": None, "hit_ratio": None}
    if redis_client is None:
        return result
    keys = [f"{settings.cache_namespace}:stats:cache_hits", f"{settings.cache_namespace}:stats:cache_misses"]
    try:
        pipe = redis_client.pipeline(transaction=False)  # not MGET: on a cluster they may be in two slots
        for key in keys:
            pipe.get(key)
        raw_hits, raw_misses = pipe.execute()
    except Exception as exc:  # redis.RedisError, OSError, a cluster error: Redis down never breaks stats
        log.warning("cache statistics unavailable: %s", type(exc).__name__)
        return result
    hits, misses = int(raw_hits or 0), int(raw_misses or 0)
    result.update(available=True, hits=hits, misses=misses)
    if hits + misses:
        result["hit_ratio"] = round(hits / (hits + misses), 4)
    return result


def queue_stats(conn: Any, redis_client: Any | None, settings: Settings) -> dict[str, Any]:
    """The queue at a glance, as JSON-able data (shape in the module docstring).

    ``conn`` is a DB-API connection to the notifications database (psycopg 3 or 2). In a transaction of
    its own, so every figure is relative to the same ``now()``; nothing is written.
    """
    with _read_transaction(conn):
        backlog = _backlog(conn)
        totals = _run_totals(conn)
        series = _series(conn, backlog["backlog"]["total"])
        runs = _recent_runs(conn)
        deliveries = _deliveries(conn)
        urgent_latency = _urgent_latency(conn)
    return {
        "generated_at": _iso(dt.datetime.now(dt.UTC)),
        **backlog,
        "urgent_latency_last_hour": urgent_latency,
        **totals,
        "recent_runs": runs,
        "cache": cache_stats(redis_client, settings),
        "series": series,
        "deliveries": deliveries,
    }


def failed_triggers(conn: Any, limit: int = 50) -> list[dict[str, Any]]:
    """The latest failed triggers, newest first: ids, types, times and reasons, never payloads."""
    if not 1 <= int(limit) <= FAILED_LIMIT_MAX:
        raise ValueError(f"limit must be between 1 and {FAILED_LIMIT_MAX}")
    with _read_transaction(conn):
        rows = _query(conn, "stats_failed_triggers", {"limit": int(limit)})
    return [
        {
            "id": r["id"],
            "trigger_type": r["trigger_type"],
            "priority": r["priority"],
            "created_at": _iso(r["created_at"]),
            "processed_at": _iso(r["processed_at"]),
            "attempts": r["attempts"],
            "run_id": r["run_id"],
            "last_error": r["last_error"],
        }
        for r in rows
    ]


# ---------------------------------------------------------------------------------------------- CLI


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


def _duration(run: Mapping[str, Any]) -> str:
    seconds = run["duration_seconds"]
    if run["running"]:
        return "running"
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else _age(seconds)


def _sparkline(values: Sequence[float | int | None]) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    top = max((v for v in values if v), default=0)
    if not top:
        return bars[0] * len(values)
    return "".join(bars[0] if not v else bars[max(1, round(v / top * (len(bars) - 1)))] for v in values)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A plain text table: the first ``left`` columns aligned left, the (numeric) others right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i < left else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
    return [line.rstrip() for line in lines]


def _time(iso: str | None) -> str:
    """``2026-01-02T03:04:05.678Z`` as ``2026-01-02 03:04:05Z``."""
    return "-" if not iso else iso.replace("T", " ")[:19] + "Z"


def _urgent_line(lane: Mapping[str, Any]) -> str:
    if not lane["triggers"]:
        return "no urgent trigger processed"
    return (f"p50 {lane['p50_seconds']:.1f} s, p95 {lane['p95_seconds']:.1f} s over {lane['triggers']:,} "
            "urgent triggers (INSERT to processing)")


def render(stats: Mapping[str, Any]) -> str:
    """The terminal view of :func:`queue_stats`."""
    b, age, claims = stats["backlog"], stats["oldest_pending_age_seconds"], stats["claims"]
    hour, day = stats["throughput"]["last_hour"], stats["throughput"]["last_24h"]
    cache = stats["cache"]
    ratio = "no data yet" if cache["hit_ratio"] is None else f"{cache['hit_ratio']:.1%}"
    cache_line = (
        f"hit ratio {ratio} (hits {_count(cache['hits'])}, misses {_count(cache['misses'])})"
        if cache["available"]
        else "unavailable (Redis not reachable)"
    )
    points = stats["series"]["points"]
    lines = [
        f"herald notification queue, {_time(stats['generated_at'])}",
        "",
        *_table(
            ["", "normal", "urgent", "total"],
            [
                ["pending triggers", _count(b["normal"]), _count(b["urgent"]), _count(b["total"])],
                ["oldest pending", _age(age["normal"]), _age(age["urgent"]), ""],
            ],
        ),
        "",
        f"claims            held {claims['held']:,}, expired {claims['expired']:,}",
        f"urgent latency    last hour: {_urgent_line(stats['urgent_latency_last_hour'])}",
        "",
        *_table(
            ["", "triggers processed", "failed", "delivered", "digests sent"],
            [
                [
                    name,
                    _count(w["triggers_processed"]),
                    _count(w["triggers_failed"]),
                    _count(w["notifications_delivered"]),
                    _count(w["digests_sent"]),
                ]
                for name, w in (("last hour", hour), ("last 24 hours", day))
            ],
        ),
        "",
        "outcomes, last hour: "
        + ", ".join(f"{kind} {_count(n)}" for kind, n in stats["outcomes_last_hour"].items()),
        f"cache             {cache_line}",
        "",
        f"delivered per hour, last 24h  |{_sparkline([p['delivered'] for p in points])}|",
        f"processed per hour, last 24h  |{_sparkline([p['triggers_processed'] for p in points])}|",
        "",
        "recent runs",
    ]
    runs = stats["recent_runs"]
    if runs:
        lines += _table(
            ["run id", "mode", "started", "duration", "triggers", "delivered", "failed"],
            [
                [
                    r["run_id"] + (" (dry run)" if r["dry_run"] else ""),
                    r["mode"],
                    _time(r["started_at"]),
                    _duration(r),
                    _count(r["triggers"]),
                    _count(r["counts"].get("delivered")),
                    _count(r["counts"].get("triggers_failed")),
                ]
                for r in runs
            ],
            left=3,
        )
    else:
        lines.append("(no runs yet)")
    deliveries = stats.get("deliveries")
    if deliveries:
        lines += ["", "channel deliveries (the outbox)"]
        lines += _table(
            ["channel", "pending", "due", "retrying", "oldest pending", "sent 24h", "failed 24h", "disabled 24h"],
            [
                [channel, _count(c["pending"]), _count(c["due"]), _count(c["retrying"]),
                 _age(c["oldest_pending_age_seconds"]), _count(c["last_24h"]["sent"]),
                 _count(c["last_24h"]["failed"]), _count(c["last_24h"]["disabled"])]
                for channel, c in deliveries["channels"].items()
            ],
        )
        for f in deliveries["failures"]:
            lines.append(f"  {f['count']:>7,}  {f['channel']} {f['status']}: {f['reason']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``herald stats [--json]``: the queue figures of the database and Redis herald finds."""
    import redis

    from herald import services

    settings = Settings.from_env()
    with services.ensure_services() as found:
        client = (
            redis.Redis.from_url(found.redis_url, socket_connect_timeout=2, socket_timeout=2)
            if found.redis_url
            else None
        )
        try:
            with db.connection(found.database_url, autocommit=True) as conn:
                stats = queue_stats(conn, client, settings)
        finally:
            if client is not None:
                client.close()
    if getattr(args, "json", False):
        print(json.dumps(stats, indent=2))
    else:
        print(render(stats))
    return 0
