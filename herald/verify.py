"""``herald verify``: the promises, checked by queries on a live database instead of believed.

Each check names what broke it (a trigger or a user), so a failing check is a lead, not a statistic:

- ``outcome_count``: a finished trigger whose outcomes differ from its recipients (lost or doubled);
- ``duplicate_outcome``: a (trigger, user) pair with more than one outcome;
- ``over_limit``: a user who got more normal notifications (digests included) than the rate limit in
  some sliding window;
- ``undigested``: a held notification older than the window (plus a grace period) whose user has
  budget again, still not folded into a digest;
- ``expired_claim``: a claim whose lease ran out (plus a grace period) that nobody took over;
- ``missing_delivery``: a notification of a user with an enabled channel (not disabled for its type)
  and no delivery row for it: the outbox lost one;
- ``expired_delivery_claim``: a delivery still pending under a claim whose lease ran out (plus a grace
  period): a delivery run died and nobody took it over;
- ``overdue_delivery``: a delivery due for longer than a grace period that nobody claimed: the
  ``notification_delivery`` DAG is not running or not keeping up.

Cheap enough to run after every test scenario and from housekeeping (which logs what it finds and
sets the gauge ``herald.verify.violations``). Each check reads through an index, bounded by
``since`` where history can be long.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from herald import db
from herald.config import Settings

#: Violations listed per check (the count says when there were more).
LIMIT = 100
#: Grace periods: a digest pass runs at the end of every run (every two minutes) and hourly in
#: housekeeping; a dead run's claims are taken over by the next run's claim.
UNDIGESTED_GRACE_SECONDS = 15 * 60
EXPIRED_CLAIM_GRACE_SECONDS = 10 * 60
#: notification_delivery runs every minute; a due delivery waits at most that plus a run's length.
OVERDUE_DELIVERY_GRACE_SECONDS = 15 * 60

KINDS = ("outcome_count", "duplicate_outcome", "over_limit", "undigested", "expired_claim",
         "missing_delivery", "expired_delivery_claim", "overdue_delivery")


@dataclass(frozen=True)
class Violation:
    kind: str
    subject: str  # "trigger 42", "user 7", "trigger 42 / user 7"
    detail: str


@dataclass
class Report:
    since: dt.datetime
    violations: list[Violation] = field(default_factory=list)
    #: Violations found per kind (at most LIMIT + 1: "more than LIMIT").
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def ok(self) -> bool:
        return not self.violations

    def of(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def describe(self) -> str:
        if self.ok:
            return f"herald verify: all {len(KINDS)} checks clean since {self.since.isoformat()}"
        lines = [f"herald verify: {len(self.violations)} violation(s) since {self.since.isoformat()}"]
        for kind in KINDS:
            found = self.of(kind)
            if found:
                more = " (and more)" if self.counts[kind] > LIMIT else ""
                lines.append(f"  {kind}: {len(found)}{more}")
                lines.extend(f"    {v.subject}: {v.detail}" for v in found[:20])
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "since": self.since.isoformat(),
            "counts": self.counts,
            "violations": [v.__dict__ for v in self.violations],
        }


def verify(conn: psycopg.Connection, settings: Settings, since: dt.datetime | None = None) -> Report:
    """Run every check over what happened since ``since`` (default: the retention period)."""
    if since is None:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(days=settings.retention_days)
    report = Report(since)
    params = {
        "since": since,
        "limit": LIMIT + 1,
        "retention_days": settings.retention_days,
        "rate_limit": settings.rate_limit,
        "window_seconds": settings.rate_window_seconds,
    }
    with conn.transaction():
        for kind, violations in (
            ("outcome_count", _outcome_counts(conn, params)),
            ("duplicate_outcome", _duplicates(conn, params)),
            ("over_limit", _over_limit(conn, params)),
            ("undigested", _undigested(conn, params)),
            ("expired_claim", _expired_claims(conn, params)),
            ("missing_delivery", _missing_deliveries(conn, params)),
            ("expired_delivery_claim", _expired_delivery_claims(conn, params)),
            ("overdue_delivery", _overdue_deliveries(conn, params)),
        ):
            found = list(violations)
            report.counts[kind] = len(found)
            report.violations.extend(found[:LIMIT])
    return report


def _outcome_counts(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    for trigger_id, status, recipients, outcomes in db.run(conn, "verify/trigger_outcome_counts", params):
        if status == "failed":
            detail = f"failed as a whole but has {outcomes} outcome(s)"
        elif recipients is None:
            detail = f"done without a recipient count, {outcomes} outcome(s)"
        elif outcomes < recipients:
            detail = f"{recipients} recipients but {outcomes} outcomes: {recipients - outcomes} lost"
        else:
            detail = f"{recipients} recipients but {outcomes} outcomes: {outcomes - recipients} too many"
        yield Violation("outcome_count", f"trigger {trigger_id}", detail)


def _duplicates(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    for trigger_id, user_id in db.run(conn, "verify/duplicate_outcomes", params):
        yield Violation("duplicate_outcome", f"trigger {trigger_id} / user {user_id}",
                        "has a notification and an outcome row")


def _over_limit(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    for user_id, most, first in db.run(conn, "verify/users_over_limit", params):
        yield Violation("over_limit", f"user {user_id}",
                        f"{most} normal notifications in {params['window_seconds']} s (limit "
                        f"{params['rate_limit']}), first over at {first.isoformat()}")


def _undigested(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    rows = db.run(conn, "verify/held_undigested", params | {"grace_seconds": UNDIGESTED_GRACE_SECONDS})
    for user_id, held, oldest in rows:
        yield Violation("undigested", f"user {user_id}",
                        f"{held} held notification(s) since {oldest.isoformat()}, under the limit now, "
                        "no digest")


def _expired_claims(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    rows = db.run(conn, "verify/expired_claims", params | {"grace_seconds": EXPIRED_CLAIM_GRACE_SECONDS})
    for trigger_id, claimed_by, expired in rows:
        yield Violation("expired_claim", f"trigger {trigger_id}",
                        f"claimed by {claimed_by!r}, lease ran out at {expired.isoformat()}, not taken over")


def _missing_deliveries(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    began = db.run(conn, "verify/outbox_since").fetchone()
    since = max(params["since"], began[0]) if began else params["since"]
    for notification_id, user_id, channel in db.run(conn, "verify/missing_deliveries", params | {"since": since}):
        yield Violation("missing_delivery", f"notification {notification_id} / user {user_id}",
                        f"user has an enabled {channel} channel and no {channel} delivery (or its channel "
                        "preference changed since)")


def _expired_delivery_claims(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    rows = db.run(conn, "verify/expired_delivery_claims", params | {"grace_seconds": EXPIRED_CLAIM_GRACE_SECONDS})
    for delivery_id, channel, claimed_by, expired in rows:
        yield Violation("expired_delivery_claim", f"delivery {delivery_id}",
                        f"{channel} delivery claimed by {claimed_by!r}, lease ran out at {expired.isoformat()}, "
                        "not taken over")


def _overdue_deliveries(conn: psycopg.Connection, params: dict[str, Any]) -> Iterator[Violation]:
    rows = db.run(conn, "verify/overdue_deliveries", params | {"grace_seconds": OVERDUE_DELIVERY_GRACE_SECONDS})
    for delivery_id, channel, due, attempts in rows:
        yield Violation("overdue_delivery", f"delivery {delivery_id}",
                        f"{channel} delivery due since {due.isoformat()} ({attempts} attempts so far), not claimed")


# ------------------------------------------------------------------------------------------ command


_DURATION = re.compile(r"^(\d+)\s*([smhd])$")


def parse_since(value: str) -> dt.datetime:
    """``2h``, ``30m``, ``7d`` (ago) or an ISO timestamp (UTC when it has no offset)."""
    match = _DURATION.match(value.strip())
    if match:
        seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration (2h, 30m, 7d) or an ISO timestamp: {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=parse_since, default=None,
                        help="check what happened since: a duration ago (2h, 30m, 7d) or an ISO timestamp "
                             "(default: the retention period)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from herald import services

    settings = Settings.from_env()
    with services.ensure_services(need_redis=False) as found, db.connection(found.database_url) as conn:
        conn.autocommit = True
        report = verify(conn, settings, args.since)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.describe())
    return 0 if report.ok else 1
