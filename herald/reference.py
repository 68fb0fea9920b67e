"""The sequential reference processor: the previous system's legacy path, kept as oracle and baseline.

One trigger at a time, one recipient at a time, with ordinary per-row SQL, each trigger committed on
its own. It is deliberately naive (its statement count grows with triggers and recipients: that is
the baseline the benchmark measures the batch pipeline against) and deliberately independent: it
shares no rule logic with the batch pipeline, only the templates (``herald.templates``), so the
differential test compares two separate readings of the same business rules:

- A trigger with ``user_id`` goes to that user, who must exist; otherwise it goes to everyone who
  favorited its ``(entity_type, entity_id)`` (nobody: done with no recipients).
- A trigger that cannot be processed at all (unknown type, neither a user nor an entity, a payload the
  template cannot render, a direct user that does not exist) ends ``failed`` with its reason.
- Per recipient, exactly one outcome: ``failed`` (the favoriter does not exist), ``skipped_preference``
  (the type is disabled and the template does not bypass preferences), ``delivered`` (urgent, or the
  user got fewer than ``rate_limit`` notifications in the window, digests and urgent ones included,
  and is not owed a digest), else ``rate_limited``, later folded into one digest once the user is
  under the limit again.
- Urgent triggers first, then normal ones, each by ascending id; recipients by ascending user id.

The rate limit is counted from PostgreSQL only. Triggers are not claimed: pending triggers are
processed directly, except those another run holds a live claim on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from herald import db
from herald.config import Settings
from herald.templates import RenderError, Template

log = logging.getLogger(__name__)


def _run(conn: psycopg.Connection, name: str, params: dict[str, Any] | None = None) -> psycopg.Cursor:
    """A per-row query, prepared by psycopg after its fifth run as any per-row code would have it."""
    return db.run(conn, name, params, prepare=None)

DELIVERED = "delivered"
SKIPPED_PREFERENCE = "skipped_preference"
RATE_LIMITED = "rate_limited"
DIGESTED = "digested"
FAILED = "failed"

RATE_LIMITED_REASON = "over the per-user rate limit"
DIGEST_TITLE = "{held} more updates on your favorites"
DIGEST_BODY = "You have {held} more updates that were held back so you are not flooded."

#: The keys of ``run_reference``'s counts (the batch pipeline's run summary uses the same names).
COUNT_KEYS = (
    DELIVERED, SKIPPED_PREFERENCE, RATE_LIMITED, DIGESTED, FAILED,
    "triggers", "triggers_done", "triggers_failed", "recipients", "digests_sent",
)


class TriggerFailed(Exception):
    """A trigger that cannot be processed at all; the message is its ``last_error``."""


@dataclass(frozen=True)
class Trigger:
    id: int
    trigger_type: str
    entity_type: str | None
    entity_id: int | None
    user_id: int | None
    priority: str
    payload: Any

    @property
    def urgent(self) -> bool:
        return self.priority == "urgent"

    @property
    def direct(self) -> bool:
        return self.user_id is not None


@dataclass(frozen=True)
class Message:
    """What every recipient of one trigger receives."""

    title: str
    body: str
    bypass_preferences: bool


def run_reference(conn: psycopg.Connection, settings: Settings) -> dict[str, int]:
    """Process every pending trigger sequentially, then the digest pass; return counts per outcome."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    with conn.transaction():
        trigger_ids = [row[0] for row in _run(conn, "reference_pending_trigger_ids")]
    for trigger_id in trigger_ids:
        with conn.transaction():
            outcomes = process_trigger(conn, trigger_id, settings)
        if outcomes is None:
            continue  # taken by someone else meanwhile
        counts["triggers"] += 1
        if isinstance(outcomes, TriggerFailed):
            counts["triggers_failed"] += 1
            continue
        counts["triggers_done"] += 1
        counts["recipients"] += len(outcomes)
        for outcome in outcomes:
            counts[outcome] += 1
    counts["digests_sent"], counts[DIGESTED] = _digest_pass(conn, settings)
    log.info("reference run: %s", counts)
    return counts


def process_trigger(
    conn: psycopg.Connection, trigger_id: int, settings: Settings
) -> list[str] | TriggerFailed | None:
    """Process one pending trigger inside the caller's transaction.

    Returns the outcome of each recipient, the failure that ended the trigger, or None when the
    trigger is no longer pending or someone else holds it.
    """
    row = _run(conn, "reference_lock_trigger", {"trigger_id": trigger_id}).fetchone()
    if row is None:
        return None
    trigger = Trigger(*row)
    try:
        message = _message(conn, trigger)
        recipients = _recipients(conn, trigger)
    except TriggerFailed as exc:
        _finish(conn, trigger, "failed", str(exc), 0)
        log.debug("trigger %s failed: %s", trigger.id, exc)
        return exc
    outcomes = [_deliver(conn, trigger, message, user_id, settings) for user_id in recipients]
    _finish(conn, trigger, "done", None, len(recipients))
    log.debug("trigger %s done: %s recipients", trigger.id, len(recipients))
    return outcomes


def _message(conn: psycopg.Connection, trigger: Trigger) -> Message:
    """The trigger's rendered title and body; raises TriggerFailed when it cannot be made."""
    row = _run(conn, "reference_template", {"trigger_type": trigger.trigger_type}).fetchone()
    if row is None:
        raise TriggerFailed(f"unknown trigger_type {trigger.trigger_type!r}: no template")
    if not trigger.direct and (trigger.entity_type is None or trigger.entity_id is None):
        raise TriggerFailed("invalid trigger: neither user_id nor entity_type and entity_id are set")
    template = Template(*row)
    try:
        title, body = template.render(trigger.payload)
    except RenderError as exc:
        raise TriggerFailed(str(exc)) from None
    return Message(title, body, template.bypass_preferences)


def _recipients(conn: psycopg.Connection, trigger: Trigger) -> list[int]:
    """The direct user (who must exist), or everyone who favorited the entity, by ascending id."""
    if trigger.direct:
        if not _run(conn, "reference_user_exists", {"user_id": trigger.user_id}).fetchone()[0]:
            raise TriggerFailed(f"user {trigger.user_id} does not exist")
        return [trigger.user_id]
    params = {"entity_type": trigger.entity_type, "entity_id": trigger.entity_id}
    return [row[0] for row in _run(conn, "reference_favoriters", params)]


def _deliver(
    conn: psycopg.Connection, trigger: Trigger, message: Message, user_id: int, settings: Settings
) -> str:
    """Decide and record one recipient's outcome."""
    user = _run(conn, "reference_user_preference",
                  {"user_id": user_id, "notification_type": trigger.trigger_type}).fetchone()
    if user is None:
        return _record_outcome(conn, trigger, user_id, FAILED, f"user {user_id} does not exist")
    enabled = user[1] is not False  # no preference row: enabled
    if not enabled and not message.bypass_preferences:
        return _record_outcome(conn, trigger, user_id, SKIPPED_PREFERENCE, None)
    if not trigger.urgent and (_owed_digest(conn, user_id)
                               or _recent_count(conn, user_id, settings) >= settings.rate_limit):
        return _record_outcome(conn, trigger, user_id, RATE_LIMITED, RATE_LIMITED_REASON)
    _run(conn, "reference_insert_notification", {
        "user_id": user_id, "trigger_id": trigger.id, "notification_type": trigger.trigger_type,
        "title": message.title, "body": message.body, "payload": Jsonb(trigger.payload),
        "priority": trigger.priority,
    })
    return DELIVERED


def _recent_count(conn: psycopg.Connection, user_id: int, settings: Settings) -> int:
    """Notifications the user received in the rate-limit window (every kind counts)."""
    params = {"user_id": user_id, "window_seconds": settings.rate_window_seconds}
    return _run(conn, "reference_recent_count", params).fetchone()[0]


def _owed_digest(conn: psycopg.Connection, user_id: int) -> bool:
    """Whether held notifications wait for the user's digest (which then comes first)."""
    return _run(conn, "reference_user_held", {"user_id": user_id}).fetchone()[0]


def _record_outcome(
    conn: psycopg.Connection, trigger: Trigger, user_id: int, outcome: str, reason: str | None
) -> str:
    _run(conn, "reference_insert_outcome",
           {"trigger_id": trigger.id, "user_id": user_id, "outcome": outcome, "reason": reason})
    return outcome


def _finish(
    conn: psycopg.Connection, trigger: Trigger, status: str, error: str | None, recipients: int
) -> None:
    _run(conn, "reference_finish_trigger",
           {"trigger_id": trigger.id, "status": status, "error": error, "recipients": recipients})


# ------------------------------------------------------------------------------------------ digests


def reference_digests(conn: psycopg.Connection, settings: Settings) -> int:
    """Send one digest to every user with held (rate-limited) outcomes who is under the limit now.

    One user at a time, each committed on its own; returns how many digests were sent.
    """
    return _digest_pass(conn, settings)[0]


def _digest_pass(conn: psycopg.Connection, settings: Settings) -> tuple[int, int]:
    """``(digests sent, outcomes folded into them)``."""
    with conn.transaction():
        users = [row[0] for row in _run(conn, "reference_held_users")]
    sent = folded = 0
    for user_id in users:
        with conn.transaction():
            held = _send_digest(conn, user_id, settings)
        if held:
            sent += 1
            folded += held
    log.info("reference digest pass: %s digests for %s held outcomes (%s users still over their limit)",
             sent, folded, len(users) - sent)
    return sent, folded


def _send_digest(conn: psycopg.Connection, user_id: int, settings: Settings) -> int:
    """Digest one user's held outcomes if they are under the limit; return how many were folded."""
    held = [row[0] for row in _run(conn, "reference_held_outcomes", {"user_id": user_id})]
    if not held or _recent_count(conn, user_id, settings) >= settings.rate_limit:
        return 0
    through = max(held)
    digest_id = _run(conn, "reference_insert_digest", {
        "user_id": user_id,
        "title": DIGEST_TITLE.format(held=len(held)),
        "body": DIGEST_BODY.format(held=len(held)),
        "payload": Jsonb({"held": len(held), "through_trigger_id": through}),
    }).fetchone()[0]
    _run(conn, "reference_mark_digested",
           {"user_id": user_id, "digest_id": digest_id, "through_trigger_id": through})
    return len(held)
