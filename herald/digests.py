"""Digests: what the rate limit held back reaches the user as one summary, once they have budget.

A rate-limited recipient is never dropped: its outcome stays ``rate_limited`` until a digest pass
finds its user under the limit again, sends one "N more updates on your favorites" notification (which
counts against the limit like any other; its channel deliveries are written with it, as for any
notification) and marks those outcomes ``digested`` with the digest's id.

A pass walks every user who is owed a digest, in chunks by user id, each chunk in a transaction that
holds its users' rate-limit locks: no batch can hold back another notification for them meanwhile, so
"N" is exactly the number of outcomes the digest folds (checked; the chunk rolls back otherwise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from herald import db
from herald.config import Settings
from herald.ratelimit import Candidate, counts_decide, lock_users, rate_state

log = logging.getLogger(__name__)

#: Users per transaction of a digest pass.
CHUNK_USERS = 5_000


class DigestMismatch(RuntimeError):
    """A digest's count and the outcomes it folded differ: the chunk was rolled back."""


@dataclass(frozen=True)
class DigestPass:
    sent: int = 0  # digest notifications written
    folded: int = 0  # rate-limited outcomes they summarise (now 'digested')
    waiting: int = 0  # users still owed a digest, over their limit for now
    deliveries: int = 0  # channel deliveries written with the digests (the outbox)


def send_digests(conn: psycopg.Connection, settings: Settings, *, chunk: int = CHUNK_USERS) -> DigestPass:
    """Send the digests that fit in their users' budget now, for every user who is owed one."""
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED  # counts read after the locks must see all
    after = -(2**63)
    users = _owed(conn, after, chunk)
    if not users:
        return DigestPass()  # the usual case: one cheap statement
    if not db.run(conn, "digest_pass_lock").fetchone()[0]:
        log.info("another digest pass is running; skipping")
        return DigestPass()
    sent = folded = waiting = deliveries = 0
    try:
        while users:
            with conn.transaction():
                s, f, w, d = _digest_chunk(conn, users, settings)
            sent, folded, waiting, deliveries = sent + s, folded + f, waiting + w, deliveries + d
            users = _owed(conn, users[-1], chunk) if len(users) == chunk else []
    finally:
        db.run(conn, "digest_pass_unlock")
    if sent or waiting:
        log.info("sent %s digests folding %s held notifications (%s users still over their limit)",
                 sent, folded, waiting)
    return DigestPass(sent, folded, waiting, deliveries)


def _owed(conn: psycopg.Connection, after: int, chunk: int) -> list[int]:
    return [r[0] for r in db.run(conn, "users_owed_digest", {"after": after, "limit": chunk})]


def _digest_chunk(conn: psycopg.Connection, users: list[int], settings: Settings) -> tuple[int, int, int, int]:
    lock_users(conn, users)
    pending = db.run(conn, "pending_digests", {"user_ids": users}).fetchall()
    state = rate_state(conn, {p[0]: 1 for p in pending}, settings)  # one digest each
    allowed = counts_decide([Candidate(p[0], False) for p in pending], state.recent, settings.rate_limit)
    ready = [p for p, ok in zip(pending, allowed, strict=True) if ok]
    if not ready:
        return 0, 0, len(pending), 0
    digests = db.run(conn, "insert_digests", {
        "user_ids": [p[0] for p in ready], "held": [p[1] for p in ready],
        "last_trigger_ids": [p[2] for p in ready],
    }).fetchall()
    digest_of = {user_id: digest_id for digest_id, user_id, _ in digests}
    deliveries = digests[0][2] if digests else 0
    folded = db.run(conn, "mark_digested", {
        "user_ids": [p[0] for p in ready], "digest_ids": [digest_of[p[0]] for p in ready],
        "last_trigger_ids": [p[2] for p in ready],
    }).rowcount
    promised = sum(p[1] for p in ready)
    if folded != promised:
        raise DigestMismatch(f"digests announce {promised} held notifications but {folded} were folded")
    return len(ready), folded, len(pending) - len(ready), deliveries
