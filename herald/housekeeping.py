"""Housekeeping: expired claims, old outcome, delivery and run records, Redis keys, late digests, and
``herald verify``."""

from __future__ import annotations

import datetime as dt
import logging

import psycopg
import redis

from herald import db
from herald.cache import STATS_TTL_SECONDS
from herald.config import Settings
from herald.digests import send_digests
from herald.verify import verify

log = logging.getLogger(__name__)

PURGE_CHUNK = 50_000
#: What each (hourly) housekeeping pass checks with ``herald verify``: the last two hours, so that
#: consecutive passes overlap.
VERIFY_LOOKBACK = dt.timedelta(hours=2)


def run(conn: psycopg.Connection, client: redis.Redis | None, settings: Settings) -> dict[str, int]:
    """One housekeeping pass; returns what it did, as counts."""
    done: dict[str, int] = {}
    with conn.transaction():
        done["expired_claims_released"] = len(db.run(conn, "release_expired_claims").fetchall())
        done["exhausted_triggers_failed"] = len(
            db.run(conn, "fail_exhausted_triggers", {"max_attempts": settings.max_attempts}).fetchall())
    purged = 0
    while True:  # bounded chunks keep each transaction short on a big table
        with conn.transaction():
            n = db.run(conn, "purge_old_outcomes",
                       {"retention_days": settings.retention_days, "chunk": PURGE_CHUNK}).rowcount
        purged += n
        if n < PURGE_CHUNK:
            break
    done["old_outcomes_purged"] = purged
    purged = 0
    while True:
        with conn.transaction():
            n = db.run(conn, "purge_old_deliveries",
                       {"retention_days": settings.retention_days, "chunk": PURGE_CHUNK}).rowcount
        purged += n
        if n < PURGE_CHUNK:
            break
    done["old_deliveries_purged"] = purged
    with conn.transaction():
        done["old_runs_purged"] = db.run(conn, "purge_old_runs", {"retention_days": settings.retention_days}).rowcount
    digests = send_digests(conn, settings)
    done["digests_sent"], done["outcomes_digested"] = digests.sent, digests.folded
    done["redis_keys_fixed"] = _expire_orphan_keys(client, settings)
    report = verify(conn, settings, since=dt.datetime.now(dt.UTC) - VERIFY_LOOKBACK)
    done["verify_violations"] = len(report.violations)
    if report.ok:
        log.info("housekeeping: %s", done)
    else:
        log.error("housekeeping: %s\n%s", done, report.describe())
    return done


def _expire_orphan_keys(client: redis.Redis | None, settings: Settings) -> int:
    """Give a TTL to any herald key that lost it (e.g. written by hand), so nothing lives forever."""
    if client is None:
        return 0
    fixed = 0
    ttl_ms = {"fav": settings.favorites_ttl_seconds * 1000, "pref": settings.preferences_ttl_seconds * 1000,
              "stats": STATS_TTL_SECONDS * 1000,
              "rl": settings.rate_window_seconds * 1000, "attempt": settings.rate_window_seconds * 1000}
    try:
        for kind, ttl in ttl_ms.items():
            for key in client.scan_iter(match=f"{settings.cache_namespace}:{kind}:*", count=1000):
                if client.pttl(key) == -1:
                    client.pexpire(key, ttl)
                    fixed += 1
    except redis.RedisError as exc:
        log.warning("Redis unavailable for housekeeping (%s)", type(exc).__name__)
    return fixed
