"""The processing core: one claimed batch of triggers in, notifications and outcomes out.

Set-based throughout: whatever the number of triggers and users, a batch costs a fixed handful of SQL
statements (start, load triggers, templates, recipients, preferences, lock, rate state, three writes)
and at most three Redis round trips (two cache reads, one cache write).

Outbox: the statement that writes the notifications also writes their deliveries (one per enabled
channel address of the user that no channel preference disables, ``notification_deliveries``), so a
notification and its deliveries exist together or not at all; the ``notification_delivery`` DAG sends
them (``herald.channels``).

Every recipient of a finished trigger ends with exactly one outcome: ``delivered`` (its row in
``notifications``), or a row in ``notification_outcomes`` (``skipped_preference``, ``rate_limited``,
``failed``). A trigger that cannot be processed at all (unknown type, a payload that cannot be decoded
or rendered, a direct user that does not exist) ends ``failed`` with its reason; the rest of the batch
goes on.

Ownership: the batch first counts an attempt and renews its triggers' lease (committed at once), then
works in one transaction that holds its triggers' rows locked from the load to the commit. No other
run can claim them meanwhile and nothing can release them, so a batch writes only what it owns, and
every trigger it loaded is ended by it or by nobody (it checks, and rolls back otherwise).

A dry run computes the same batch in a transaction that is always rolled back, and writes nothing,
not even to the cache.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
import redis

from herald import db
from herald.cache import Entity, RecipientCache
from herald.claiming import Batch
from herald.config import Settings
from herald.ratelimit import Candidate, RateState, counts_decide, lock_users, rate_state
from herald.templates import RenderError, Template

log = logging.getLogger(__name__)

DELIVERED = "delivered"
SKIPPED_PREFERENCE = "skipped_preference"
RATE_LIMITED = "rate_limited"
DIGESTED = "digested"
FAILED = "failed"
OUTCOMES = (DELIVERED, SKIPPED_PREFERENCE, RATE_LIMITED, DIGESTED, FAILED)

#: Called with a stage name between the steps of a batch; tests inject faults through it.
#: Stages: ``after_load`` (triggers locked), ``before_limit``, ``before_write``, ``after_write``
#: (written, not yet committed).
Checkpoint = Callable[[str], None]


class ClaimLost(RuntimeError):
    """The batch could not end every trigger it loaded: it rolls back and writes nothing."""


@dataclass
class BatchResult:
    """What one batch wrote (for a dry run: would have written)."""

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
    #: Channel deliveries written with the notifications (the outbox); a dry run does not count them.
    deliveries: int = 0
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
    fin_ids: list[int] = field(default_factory=list)
    fin_statuses: list[str] = field(default_factory=list)
    fin_errors: list[str | None] = field(default_factory=list)
    fin_recipients: list[int] = field(default_factory=list)

    def outcome(self, trigger_id: int, user_id: int, outcome: str) -> None:
        """Its reason is derived from the outcome when written (insert_outcomes.sql)."""
        self.out_triggers.append(trigger_id)
        self.out_users.append(user_id)
        self.outcomes.append(outcome)

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
    """Process the triggers ``batch.claim_id`` claimed under ``batch.batch``; see the module doc."""
    started = time.perf_counter()
    result = BatchResult(batch.claim_id, batch.batch, batch.priority, dry_run=dry_run)
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED  # the window count needs a fresh snapshot
    key = {"claim_id": batch.claim_id, "batch": batch.batch}
    if not dry_run:
        with conn.transaction():
            begun = db.run(conn, "begin_batch", key | {"lease_seconds": settings.claim_lease_seconds}).fetchall()
        if not begun:
            log.info("batch %s/%s: nothing pending under this claim (already processed, or taken over "
                     "by another run after the lease ran out)", batch.claim_id, batch.batch)
            return result
    cache = RecipientCache(redis_client, settings, read_only=dry_run)
    with conn.transaction():
        if dry_run:
            ids = db.run(conn, "dry_run_batch_triggers", {"run_id": batch.claim_id, "batch": batch.batch})
            db.run(conn, "dry_run_take_batch", key | {"ids": ids.fetchone()[0]})
        plan = _compute(conn, cache, batch, settings, result, dry_run=dry_run, checkpoint=checkpoint)
        if plan is not None and not dry_run:
            _write(conn, plan, batch.claim_id, result)
            if checkpoint:
                checkpoint("after_write")
        elif plan is not None:
            _count_planned(plan, result)
        if dry_run:
            raise psycopg.Rollback()
    result.redis_available = cache.available
    result.duration_seconds = round(time.perf_counter() - started, 4)
    log.info(
        "batch %s/%s %s: %s triggers (%s failed), %s recipients: %s delivered, %s skipped, %s rate-limited, "
        "%s failed%s",
        batch.claim_id, batch.batch, batch.priority, result.triggers, result.triggers_failed, result.recipients,
        result.delivered, result.skipped_preference, result.rate_limited, result.failed,
        " (dry run, nothing written)" if dry_run else "",
    )
    return result


def _compute(
    conn: psycopg.Connection,
    cache: RecipientCache,
    batch: Batch,
    settings: Settings,
    result: BatchResult,
    *,
    dry_run: bool,
    checkpoint: Checkpoint | None,
) -> _Plan | None:
    """Load, render, fan out, decide: the plan of what to write (inside the batch's transaction)."""
    rows = db.run(conn, "load_batch_triggers", {"claim_id": batch.claim_id, "batch": batch.batch}).fetchall()
    if checkpoint:
        checkpoint("after_load")
    result.triggers = len(rows)
    if not rows:
        log.info("batch %s/%s: nothing pending (already processed)", batch.claim_id, batch.batch)
        return None
    triggers, templates, errors = _decode(rows)
    plan = _Plan()
    rendered = _render([t for t in triggers if t.id not in errors], templates, errors)

    favorites, preferences = _load_recipients(conn, cache, [t for t in triggers if t.id in rendered])
    # Who may not get each type: users who disabled it (one pass over the few users who disabled
    # anything), and users that do not exist. Set operations keep the per-recipient work in C.
    disabled_by_type: dict[str, set[int]] = {}
    for user_id, disabled in preferences.items():
        for trigger_type in disabled:
            disabled_by_type.setdefault(trigger_type, set()).add(user_id)
    cand_triggers: list[int] = []  # the candidates, in decision order (trigger id, then user id)
    cand_users: list[int] = []
    urgent_triggers: set[int] = set()
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
        disabled = set() if template.bypass_preferences else disabled_by_type.get(t.trigger_type, set())
        if disabled.isdisjoint(recipients) and preferences.keys() >= set(recipients):
            ok = recipients
        else:
            ok = []
            for user_id in recipients:
                if user_id not in preferences:
                    plan.outcome(t.id, user_id, FAILED)  # "user N does not exist"
                elif user_id in disabled:
                    plan.outcome(t.id, user_id, SKIPPED_PREFERENCE)
                else:
                    ok.append(user_id)
        cand_triggers.extend([t.id] * len(ok))
        cand_users.extend(ok)
        if t.priority == "urgent":
            urgent_triggers.add(t.id)
        plan.finish(t.id, None, len(recipients))
        result.recipients += len(recipients)
        plan.msg_triggers.append(t.id)
        plan.titles.append(rendered[t.id][0])
        plan.bodies.append(rendered[t.id][1])

    if checkpoint:
        checkpoint("before_limit")
    if not dry_run:  # a dry run writes nothing, so it needs no lock against other writers
        lock_users(conn, set(cand_users))
    # Urgent candidates are never held back: only users with a normal one need their window counted
    # (with all their candidates of the batch, urgent ones included: they count).
    per_user = Counter(cand_users)
    normal_users = {u for tid, u in zip(cand_triggers, cand_users, strict=True) if tid not in urgent_triggers}
    state = rate_state(conn, {u: per_user[u] for u in normal_users}, settings)
    _decide(plan, cand_triggers, cand_users, urgent_triggers, state, settings.rate_limit)
    if checkpoint:
        checkpoint("before_write")
    return plan


def _decide(plan: _Plan, cand_triggers: list[int], cand_users: list[int], urgent_triggers: set[int],
            state: RateState, limit: int) -> None:
    """The rate-limit rule (``ratelimit.counts_decide``) over the candidates, in order, into the plan.

    Only users the rate state names (owed a digest, or with window + candidates over the limit) can have
    anything held back, so only their candidates go through the rule; everyone else's all go out.
    """
    attention = state.recent.keys() | state.held
    looked = [i for i, u in enumerate(cand_users) if u in attention] if attention else []
    allowed = counts_decide([Candidate(cand_users[i], cand_triggers[i] in urgent_triggers) for i in looked],
                            state.recent, limit, state.held)
    held = {i for i, ok in zip(looked, allowed, strict=True) if not ok}
    if not held:
        plan.notif_triggers.extend(cand_triggers)
        plan.notif_users.extend(cand_users)
        return
    for i, (trigger_id, user_id) in enumerate(zip(cand_triggers, cand_users, strict=True)):
        if i in held:
            plan.outcome(trigger_id, user_id, RATE_LIMITED)
        else:
            plan.notif_triggers.append(trigger_id)
            plan.notif_users.append(user_id)


def _decode(rows: list[tuple]) -> tuple[list[_Trigger], dict[str, Template], dict[int, str]]:
    """Triggers with their payloads decoded one by one (a payload that cannot be decoded fails alone),
    and the templates of their types."""
    triggers: list[_Trigger] = []
    templates: dict[str, Template] = {}
    errors: dict[int, str] = {}
    for (trigger_id, trigger_type, entity_type, entity_id, user_id, priority, payload_text, attempts,
         title, body, bypass) in rows:
        if title is not None and trigger_type not in templates:
            templates[trigger_type] = Template(trigger_type, title, body, bypass)
        try:
            payload = json.loads(payload_text)
        except (ValueError, RecursionError) as exc:  # >4,300-digit numbers, nesting deeper than Python's stack
            payload = None
            errors[trigger_id] = f"payload cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}"
        triggers.append(_Trigger(trigger_id, trigger_type, entity_type, entity_id, user_id, priority, payload,
                                 attempts))
    return triggers, templates, errors


def _render(
    triggers: list[_Trigger], templates: dict[str, Template], errors: dict[int, str]
) -> dict[int, tuple[str, str]]:
    """Title and body per trigger (not per user: templates see the payload only); errors go to ``errors``."""
    rendered: dict[int, tuple[str, str]] = {}
    for t in triggers:
        template = templates.get(t.trigger_type)
        if template is None:
            errors[t.id] = f"unknown trigger_type {str(t.trigger_type)[:200]!r}: no template"
        elif t.user_id is None and (t.entity_type is None or t.entity_id is None):
            errors[t.id] = "invalid trigger: neither user_id nor entity_type and entity_id are set"
        else:
            try:
                rendered[t.id] = template.render(t.payload)
            except RenderError as exc:
                errors[t.id] = str(exc)
    return rendered


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
        rows = db.run(conn, "user_preferences", {"user_ids": db.int_array(missing_users)})
        shared: dict[tuple[str, ...], frozenset[str]] = {}  # most users share one of a few values
        for user_id, disabled in rows:
            key = tuple(disabled)
            value = shared.get(key)
            if value is None:
                value = shared[key] = frozenset(disabled)
            fresh_preferences[user_id] = value
        preferences.update(fresh_preferences)
    cache.store(fresh_favorites, fresh_preferences)
    return favorites, preferences


def _write(conn: psycopg.Connection, plan: _Plan, claim_id: str, result: BatchResult) -> None:
    """Write the plan (notifications with their deliveries, outcomes, trigger ends) and count what was
    written; roll back if any loaded trigger could not be ended."""
    if plan.notif_users:
        result.delivered, deliveries = db.run(conn, "insert_notifications", {
            "trigger_ids": db.int_array(plan.notif_triggers), "user_ids": db.int_array(plan.notif_users),
            "msg_trigger_ids": db.int_array(plan.msg_triggers), "titles": plan.titles, "bodies": plan.bodies,
        }).fetchone()
        result.deliveries = sum(deliveries.values())
        if deliveries:
            log.info("batch of %s: %s deliveries in the outbox (%s)", claim_id, result.deliveries,
                     ", ".join(f"{channel} {n}" for channel, n in sorted(deliveries.items())))
        if result.delivered != len(plan.notif_users):
            log.warning("batch of %s: %s of %s notifications existed already", claim_id,
                        len(plan.notif_users) - result.delivered, len(plan.notif_users))
    if plan.out_users:
        written = db.run(conn, "insert_outcomes", {
            "trigger_ids": db.int_array(plan.out_triggers), "user_ids": db.int_array(plan.out_users),
            "outcomes": _words(plan.outcomes),
        })
        for outcome, n in written:
            setattr(result, outcome, n)
    ended = Counter(dict(db.run(conn, "finish_triggers", {
        "claim_id": claim_id, "ids": db.int_array(plan.fin_ids), "statuses": _words(plan.fin_statuses),
        "errors": plan.fin_errors, "recipients": db.int_array(plan.fin_recipients),
    }).fetchall()))
    if sum(ended.values()) != len(plan.fin_ids):
        raise ClaimLost(f"run {claim_id} could end only {sum(ended.values())} of the {len(plan.fin_ids)} "
                        "triggers it loaded; nothing of this batch was written")
    result.triggers_done, result.triggers_failed = ended["done"], ended["failed"]


def _words(values: list[str]) -> str:
    """An array literal of outcome or status words (a fixed vocabulary: nothing to quote)."""
    return "{" + ",".join(values) + "}"


def _count_planned(plan: _Plan, result: BatchResult) -> None:
    """A dry run's figures: what the plan would write."""
    result.delivered = len(plan.notif_users)
    for outcome, n in Counter(plan.outcomes).items():
        setattr(result, outcome, n)
    result.triggers_failed = plan.fin_statuses.count("failed")
    result.triggers_done = len(plan.fin_statuses) - result.triggers_failed
