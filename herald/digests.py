"""Digests: what the rate limit held back reaches the user as one summary, once they have budget.

A rate-limited recipient is never dropped: its outcome stays ``rate_limited`` until a digest pass
finds its user under the limit again, sends one "N more updates on your favorites" notification (which
counts against the limit like any other) and marks those outcomes ``digested`` with the digest's id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
import redis

from herald import db
from herald.config import Settings
from herald.ratelimit import Candidate, counts_decide, redis_decide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigestPass:
    sent: int = 0  # digest notifications written
    folded: int = 0  # rate-limited outcomes they summarise (now 'digested')


def send_digests(
    conn: psycopg.Connection, redis_client: redis.Redis | None, settings: Settings, *, limit: int = 50_000
) -> DigestPass:
    """Send the digests that fit in their users' budget now."""
    with conn.transaction():
        if not db.run(conn, "try_digest_lock").fetchone()[0]:
            log.info("another digest pass is running; skipping")
            return DigestPass()
        pending = db.run(conn, "pending_digests", {"limit": limit}).fetchall()
        if not pending:
            return DigestPass()
        users = [p[0] for p in pending]
        candidates = [Candidate(user_id, f"d:{last}", False) for user_id, _, last in pending]
        window = {"user_ids": users, "window_seconds": settings.rate_window_seconds}
        recent = dict(db.run(conn, "recent_notification_counts", window).fetchall())
        allowed: list[bool] | None = None
        if redis_client is not None:
            try:
                allowed = redis_decide(redis_client, candidates, recent, settings)
            except redis.RedisError as exc:
                log.warning("Redis rate limiter unavailable (%s); digests limited from PostgreSQL",
                            type(exc).__name__)
        if allowed is None:
            db.run(conn, "lock_users_for_rate_limit", {"user_ids": users})
            recent = dict(db.run(conn, "recent_notification_counts", window).fetchall())
            allowed = counts_decide(candidates, recent, settings.rate_limit)
        ready = [p for p, ok in zip(pending, allowed, strict=True) if ok]
        if not ready:
            return DigestPass()
        digests = db.run(conn, "insert_digests", {
            "user_ids": [p[0] for p in ready], "held": [p[1] for p in ready],
            "last_trigger_ids": [p[2] for p in ready],
        }).fetchall()
        digest_of = {user_id: digest_id for digest_id, user_id in digests}
        folded = db.run(conn, "mark_digested", {
            "user_ids": [p[0] for p in ready], "digest_ids": [digest_of[p[0]] for p in ready],
            "last_trigger_ids": [p[2] for p in ready],
        }).rowcount
    log.info("sent %s digests folding %s held notifications (%s users still over their limit)",
             len(ready), folded, len(pending) - len(ready))
    return DigestPass(len(ready), folded)
