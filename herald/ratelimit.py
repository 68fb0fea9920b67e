"""The per-user sliding-window rate limit, decided in PostgreSQL under per-user locks.

The rule: every notification a user receives (normal, urgent, digest) counts; a normal one (or a
digest) goes out only while the user received fewer than ``limit`` in the window; an urgent one always
goes out. A user who is owed a digest (held, ``rate_limited`` outcomes waiting) gets no new normal
notification before it: those are held too, and the next digest folds them all, so a held notification
is never starved by newer ones.

Why PostgreSQL and not a Redis counter: the notifications table is the only place that holds every
notification a user got, and a decision is only safe when it sees all of them, including those of a
batch that has not committed yet. So whoever decides for a user (a batch of any run or lane, a digest
pass) first takes that user's lock (``lock_users``, held until its transaction ends), then counts the
window. Nothing is counted twice on a retry (an attempt that did not commit counted nothing), and a
Redis restart, flush or outage cannot change a count. Redis only caches who to notify (``cache.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import NamedTuple

import psycopg

from herald import db
from herald.config import Settings

#: First key of the two-integer advisory locks that serialise rate-limit decisions (the second is the
#: user's bucket, see lock_rate_limit_buckets.sql); no other herald lock uses this key space.
LOCK_CLASS = 0x6872  # "hr"


class Candidate(NamedTuple):  # a tuple: batches make tens of thousands of them
    user_id: int
    urgent: bool


class RateState(NamedTuple):
    #: Notifications in the window of every user the decision may hold something back for (absent: the
    #: user can take all the candidates asked about, so their exact count does not matter).
    recent: dict[int, int]
    held: frozenset[int]  # users with held outcomes waiting for a digest


def lock_users(conn: psycopg.Connection, user_ids: Iterable[int]) -> None:
    """Take the rate-limit locks of these users until the current transaction ends."""
    users = sorted(set(user_ids))
    if users:
        db.run(conn, "lock_rate_limit_buckets", {"lock_class": LOCK_CLASS, "user_ids": db.int_array(users)})


def rate_state(conn: psycopg.Connection, normal: Mapping[int, int], settings: Settings) -> RateState:
    """Window counts and owed digests of the users of ``normal`` (user -> normal candidates the decision
    is about); exact when read under ``lock_users``. Only users that could have something held back are
    returned, which keeps a batch of 50,000 users from fetching 50,000 rows."""
    recent: dict[int, int] = {}
    held: set[int] = set()
    if normal:
        users = sorted(normal)
        params = {"user_ids": db.int_array(users), "normal": db.int_array(normal[u] for u in users),
                  "window_seconds": settings.rate_window_seconds, "rate_limit": settings.rate_limit}
        for user_id, count, is_held in db.run(conn, "user_rate_state", params):
            recent[user_id] = count  # every user returned (0 included): the decision must look at them
            if is_held:
                held.add(user_id)
    return RateState(recent, frozenset(held))


def counts_decide(
    candidates: Sequence[Candidate], recent: Mapping[int, int], limit: int, held: Collection[int] = ()
) -> list[bool]:
    """Allowed flag per candidate, in candidate order (pure: the rule of the module doc)."""
    used = dict(recent)
    holding = set(held)
    allowed = []
    for c in candidates:
        ok = c.urgent or (c.user_id not in holding and used.get(c.user_id, 0) < limit)
        if ok:
            used[c.user_id] = used.get(c.user_id, 0) + 1
        else:
            holding.add(c.user_id)
        allowed.append(ok)
    return allowed
