"""The processing core: one claimed batch of triggers in, notifications and outcomes out.

Set-based throughout: whatever the number of triggers and users, a batch costs a fixed handful of SQL
statements (load triggers, templates, recipients, preferences, recent counts, three writes) and at
most four Redis round trips (two cache reads, one cache write, one rate-limit script).

Every recipient of a finished trigger ends with exactly one outcome: ``delivered`` (its row in
``notifications``), or a row in ``notification_outcomes`` (``skipped_preference``, ``rate_limited``,
``failed``). A trigger that cannot be processed at all ends ``failed`` with its reason; the rest of the
batch goes on. All writes of a batch commit in one transaction, and every write is idempotent, so a
retried or repeated batch changes nothing that is already there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
import redis

from herald import db
from herald.cache import Entity, RecipientCache
from herald.claiming import Batch
from herald.config import Settings
from herald.ratelimit import Candidate, counts_decide, redis_decide
from herald.templates import RenderError, Template, load_templates

log = logging.getLogger(__name__)

DELIVERED = "delivered"
SKIPPED_PREFERENCE = "skipped_preference"
RATE_LIMITED = "rate_limited"
DIGESTED = "digested"
FAILED = "failed"
OUTCOMES = (DELIVERED, SKIPPED_PREFERENCE, RATE_LIMITED, DIGESTED, FAILED)

#: Called with a stage name between the steps of a batch; tests inject faults through it.
Checkpoint = Callable[[str], None]


@dataclass
class BatchResult:
    claim_id: str
    batch: int
    priority: str
    dry_run: bool = False
    triggers: int = 0
    triggers_done: int = 0
    triggers_failed: int = 0
    recipients: int = 0
    delivered: int = 0
    skipped_preference: int = 0
    rate_limited: int = 0
    failed: int = 0
    redis_available: bool = True
    duration_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Trigger:
    id: int
    trigger_type: str
    entity_type: str | None
    entity_id: int | None
    user_id: int | None
    priority: str
    payload: Any
    attempts: int


@dataclass
class _Plan:
    """What a batch will write, as parallel arrays ready for the set-based statements."""

    notif_triggers: list[int] = field(default_factory=list)
    notif_users: list[int] = field(default_factory=list)
    msg_triggers: list[int] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    out_triggers: list[int] = field(default_factory=list)
    out_users: list[int] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    fin_ids: list[int] = field(default_factory=list)
    fin_statuses: list[str] = field(default_factory=list)
    fin_errors: list[str | None] = field(default_factory=list)
    fin_recipients: list[int] = field(default_factory=list)

    def outcome(self, trigger_id: int, user_id: int, outcome: str, reason: str | None = None) -> None:
        self.out_triggers.append(trigger_id)
        self.out_users.append(user_id)
        self.outcomes.append(outcome)
        self.reasons.append(reason)

    def finish(self, trigger_id: int, error: str | None, recipients: int) -> None:
        self.fin_ids.append(trigger_id)
        self.fin_statuses.append("failed" if error else "done")
        self.fin_errors.append(error)
        self.fin_recipients.append(recipients)


def process_batch(
    conn: psycopg.Connection,
    redis_client: redis.Redis | None,
    batch: Batch,
    settings: Settings,
    *,
    dry_run: bool = False,
    checkpoint: Checkpoint | None = None,
) -> BatchResult:
    """Process the triggers ``batch.claim_id`` claimed under ``batch.batch``; see the module doc.

    ``dry_run`` computes everything (rate limit included, without counting) and writes nothing.
    """
    started = time.perf_counter()
    result = BatchResult(batch.claim_id, batch.batch, batch.priority, dry_run=dry_run)
    cache = RecipientCache(redis_client, settings)
    with conn.transaction():
        rows = db.run(conn, "load_batch_triggers", {"claim_id": batch.claim_id, "batch": batch.batch})
        triggers = [_Trigger(*row) for row in rows]
        result.triggers = len(triggers)
        if not triggers:
            log.info("batch %s/%s: nothing pending (already processed)", batch.claim_id, batch.batch)
            return result
        templates = load_templates(conn)
        plan = _Plan()
        rendered, errors = _render(triggers, templates)

        favorites, preferences = _load_recipients(conn, cache, [t for t in triggers if t.id in rendered])
        candidates: list[Candidate] = []
        pending: list[tuple[int, int]] = []  # (trigger_id, user_id) of each candidate
        for t in triggers:
            if t.id in errors:
                plan.finish(t.id, errors[t.id], 0)
                continue
            if t.user_id is not None:
                if t.user_id not in preferences:
                    plan.finish(t.id, f"user {t.user_id} does not exist", 0)
                    continue
                recipients = [t.user_id]
            else:
                recipients = favorites.get((t.entity_type, t.entity_id), [])
            template = templates[t.trigger_type]
            member, urgent = f"t:{t.id}", t.priority == "urgent"
            for user_id in recipients:
                disabled = preferences.get(user_id)
                if disabled is None:
                    plan.outcome(t.id, user_id, FAILED, f"user {user_id} does not exist")
                elif t.trigger_type in disabled and not template.bypass_preferences:
                    plan.outcome(t.id, user_id, SKIPPED_PREFERENCE)
                else:
                    candidates.append(Candidate(user_id, member, urgent))
                    pending.append((t.id, user_id))
            plan.finish(t.id, None, len(recipients))
            result.recipients += len(recipients)
            plan.msg_triggers.append(t.id)
            plan.titles.append(rendered[t.id][0])
            plan.bodies.append(rendered[t.id][1])

        limiter_client = redis_client if cache.available else None  # the cache already found Redis down
        attempt = f"{batch.claim_id}:{batch.batch}"
        maybe_counted = any(t.attempts > 1 for t in triggers)  # claimed before: an earlier run may have counted
        allowed, result.redis_available = _rate_limit(
            conn, limiter_client, candidates, settings, dry_run, attempt, maybe_counted)
        for (trigger_id, user_id), ok in zip(pending, allowed, strict=True):
            if ok:
                plan.notif_triggers.append(trigger_id)
                plan.notif_users.append(user_id)
            else:
                plan.outcome(trigger_id, user_id, RATE_LIMITED, "over the per-user rate limit")
        if checkpoint:
            checkpoint("before_write")
        if not dry_run:
            _write(conn, plan, batch.claim_id)
        if checkpoint:
            checkpoint("after_write")

    result.delivered = len(plan.notif_users)
    for outcome in plan.outcomes:
        setattr(result, outcome, getattr(result, outcome) + 1)
    result.triggers_failed = sum(1 for s in plan.fin_statuses if s == "failed")
    result.triggers_done = len(plan.fin_statuses) - result.triggers_failed
    result.duration_seconds = round(time.perf_counter() - started, 4)
    log.info(
        "batch %s/%s %s: %s triggers (%s failed), %s recipients: %s delivered, %s skipped, %s rate-limited, "
        "%s failed%s",
        batch.claim_id, batch.batch, batch.priority, result.triggers, result.triggers_failed, result.recipients,
        result.delivered, result.skipped_preference, result.rate_limited, result.failed,
        " (dry run, nothing written)" if dry_run else "",
    )
    return result


def _render(
    triggers: list[_Trigger], templates: dict[str, Template]
) -> tuple[dict[int, tuple[str, str]], dict[int, str]]:
    """Title and body per trigger (not per user: templates see the payload only), or its error."""
    rendered: dict[int, tuple[str, str]] = {}
    errors: dict[int, str] = {}
    for t in triggers:
        template = templates.get(t.trigger_type)
        if template is None:
            errors[t.id] = f"unknown trigger_type {t.trigger_type!r}: no template"
        elif t.user_id is None and (t.entity_type is None or t.entity_id is None):
            errors[t.id] = "invalid trigger: neither user_id nor entity_type and entity_id are set"
        else:
            try:
                rendered[t.id] = template.render(t.payload)
            except RenderError as exc:
                errors[t.id] = str(exc)
    return rendered, errors


def _load_recipients(
    conn: psycopg.Connection, cache: RecipientCache, triggers: list[_Trigger]
) -> tuple[dict[Entity, list[int]], dict[int, frozenset[str]]]:
    """Fan-out recipients per entity and disabled types per user: the cache first, PostgreSQL for misses."""
    entities = sorted({(t.entity_type, t.entity_id) for t in triggers if t.user_id is None})
    favorites = cache.favorites(entities) if entities else {}
    missing = [e for e in entities if e not in favorites]
    fresh_favorites: dict[Entity, list[int]] = {}
    if missing:
        rows = db.run(
            conn, "fanout_recipients",
            {"entity_types": [e[0] for e in missing], "entity_ids": [e[1] for e in missing]},
        )
        fresh_favorites = {(etype, eid): users or [] for etype, eid, users in rows}
        favorites.update(fresh_favorites)

    users = sorted({u for e in entities for u in favorites.get(e, ())} |
                   {t.user_id for t in triggers if t.user_id is not None})
    preferences = cache.preferences(users) if users else {}
    missing_users = [u for u in users if u not in preferences]
    fresh_preferences: dict[int, frozenset[str]] = {}
    if missing_users:
        rows = db.run(conn, "user_preferences", {"user_ids": missing_users})
        fresh_preferences = {user_id: frozenset(disabled) for user_id, disabled in rows}
        preferences.update(fresh_preferences)
    cache.store(fresh_favorites, fresh_preferences)
    return favorites, preferences


def _rate_limit(
    conn: psycopg.Connection,
    client: redis.Redis | None,
    candidates: list[Candidate],
    settings: Settings,
    dry_run: bool,
    attempt: str,
    maybe_counted: bool,
) -> tuple[list[bool], bool]:
    """Allowed flag per candidate, and whether Redis decided (False: PostgreSQL fallback)."""
    if not candidates:
        return [], client is not None
    users = sorted({c.user_id for c in candidates})
    window = {"user_ids": users, "window_seconds": settings.rate_window_seconds}
    if client is not None:
        floors = dict(db.run(conn, "recent_notification_counts", window).fetchall())
        try:
            return redis_decide(client, candidates, floors, settings, dry_run=dry_run, attempt=attempt,
                                maybe_counted=maybe_counted), True
        except redis.RedisError as exc:
            log.warning("Redis rate limiter unavailable (%s); enforcing the limit from PostgreSQL",
                        type(exc).__name__)
    # Fallback: lock the batch's users until commit so concurrent batches cannot both spend a budget.
    db.run(conn, "lock_users_for_rate_limit", {"user_ids": users})
    recent = dict(db.run(conn, "recent_notification_counts", window).fetchall())
    return counts_decide(candidates, recent, settings.rate_limit), False


def _write(conn: psycopg.Connection, plan: _Plan, claim_id: str) -> None:
    if plan.notif_users:
        db.run(conn, "insert_notifications", {
            "trigger_ids": plan.notif_triggers, "user_ids": plan.notif_users,
            "msg_trigger_ids": plan.msg_triggers, "titles": plan.titles, "bodies": plan.bodies,
        })
    if plan.out_users:
        db.run(conn, "insert_outcomes", {
            "trigger_ids": plan.out_triggers, "user_ids": plan.out_users,
            "outcomes": plan.outcomes, "reasons": plan.reasons,
        })
    db.run(conn, "finish_triggers", {
        "claim_id": claim_id, "ids": plan.fin_ids, "statuses": plan.fin_statuses,
        "errors": plan.fin_errors, "recipients": plan.fin_recipients,
    })
