"""Deterministic demo and benchmark data: workload W1 of DESIGN.md and its multiples.

W1: 5,000 users, 20 favorites each over 2,000 entities, 1,000 pending triggers (10% urgent), 20% of
users with one type disabled, about 50,000 candidate notifications. The data is a pure function of
the spec (arithmetic in ``generate_series``, no randomness), so two runs load identical rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)

CONTRACT_DATA_TABLES = (
    "notifications", "notification_outcomes", "notification_triggers",
    "user_notification_preferences", "user_favorites", "users", "herald_runs",
    "user_channels", "notification_deliveries",
)


@dataclass(frozen=True)
class WorkloadSpec:
    users: int = 5_000
    triggers: int = 1_000
    favorites_per_user: int = 20
    entities: int = 2_000
    #: One trigger in ``urgent_every`` is urgent (10%).
    urgent_every: int = 10
    #: One user in ``disabled_every`` has one type disabled (20%).
    disabled_every: int = 5
    #: Triggers already done before the pending ones (history, for realistic index sizes).
    done_triggers: int = 0
    seed: int = 1
    #: One user in ``email_every`` has an email channel (0: nobody; 2: half the users), so the outbox
    #: writes an email delivery with each of their notifications (``herald bench --email-every 2``).
    email_every: int = 0

    def scaled(self, factor: int) -> WorkloadSpec:
        """The same shape ``factor`` times larger (users, entities and triggers)."""
        return WorkloadSpec(
            users=self.users * factor, triggers=self.triggers * factor,
            favorites_per_user=self.favorites_per_user, entities=self.entities * factor,
            urgent_every=self.urgent_every, disabled_every=self.disabled_every,
            done_triggers=self.done_triggers * factor, seed=self.seed, email_every=self.email_every,
        )


def reset_tables(conn: psycopg.Connection) -> None:
    """Empty the contract and pipeline data tables (templates and migrations stay)."""
    with conn.transaction():
        conn.execute("TRUNCATE " + ", ".join(CONTRACT_DATA_TABLES) + " RESTART IDENTITY")  # fixed names


def seed(conn: psycopg.Connection, spec: WorkloadSpec, *, reset: bool = False) -> str:
    """Load the workload; returns a one-line summary. ``reset`` empties the tables first."""
    if reset:
        reset_tables(conn)
    params = {
        "users": spec.users, "entities": spec.entities, "favs": spec.favorites_per_user,
        "triggers": spec.triggers, "urgent_every": spec.urgent_every, "disabled_every": spec.disabled_every,
        "done": spec.done_triggers, "seed": spec.seed, "email_every": spec.email_every,
    }
    # Entity of favorite k of user u: ((u * 7919 + k * 729 + seed) mod E) + 1. 729 is coprime to every
    # E used here that is not a multiple of 3, so a user's favorites are distinct while k < E.
    with conn.transaction():
        first_user = conn.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0]
        params["base"] = first_user
        conn.execute(
            """
            INSERT INTO users (id, email, timezone, created_at)
            SELECT %(base)s + g, 'user' || (%(base)s + g) || '@example.test', 'UTC', now() - interval '30 days'
            FROM generate_series(1, %(users)s) g
            """, params)
        conn.execute(
            """
            INSERT INTO user_favorites (user_id, entity_type, entity_id)
            SELECT DISTINCT %(base)s + u, 'item', ((u::bigint * 7919 + k * 729 + %(seed)s) %% %(entities)s) + 1
            FROM generate_series(1, %(users)s) u, generate_series(0, %(favs)s - 1) k
            """, params)
        conn.execute(
            """
            INSERT INTO user_notification_preferences (user_id, notification_type, enabled)
            SELECT %(base)s + u,
                   (ARRAY['price_drop', 'back_in_stock', 'event_reminder'])[(u / %(disabled_every)s) %% 3 + 1],
                   false
            FROM generate_series(1, %(users)s) u
            WHERE u %% %(disabled_every)s = 0
            """, params)
        if spec.email_every:
            conn.execute(
                """
                INSERT INTO user_channels (user_id, channel, address)
                SELECT %(base)s + u, 'email', 'user' || (%(base)s + u) || '@example.test'
                FROM generate_series(1, %(users)s) u
                WHERE u %% %(email_every)s = 0
                """, params)
        # History first (done), then the pending triggers: urgent ones are event reminders.
        conn.execute(
            """
            INSERT INTO notification_triggers
                (trigger_type, entity_type, entity_id, priority, payload, status, created_at, processed_at)
            SELECT (ARRAY['price_drop', 'back_in_stock', 'event_reminder'])[i %% 3 + 1], 'item',
                   ((i::bigint * 37 + %(seed)s) %% %(entities)s) + 1, 'normal',
                   jsonb_build_object('item_name', 'Item ' || i, 'old_price', '49.00', 'new_price', '39.00',
                                      'event_name', 'Event ' || i, 'starts_at', '18:00'),
                   'done', now() - interval '2 days', now() - interval '2 days'
            FROM generate_series(1, %(done)s) i
            """, params)
        conn.execute(
            """
            INSERT INTO notification_triggers (trigger_type, entity_type, entity_id, priority, payload)
            SELECT CASE WHEN i %% %(urgent_every)s = 0 THEN 'event_reminder'
                        ELSE (ARRAY['price_drop', 'back_in_stock', 'event_reminder'])[i %% 3 + 1] END,
                   'item', ((i::bigint * 37 + %(seed)s) %% %(entities)s) + 1,
                   CASE WHEN i %% %(urgent_every)s = 0 THEN 'urgent' ELSE 'normal' END,
                   jsonb_build_object('item_name', 'Item ' || i, 'old_price', '49.00', 'new_price', '39.00',
                                      'event_name', 'Event ' || i, 'starts_at', '18:00')
            FROM generate_series(1, %(triggers)s) i
            """, params)
    # As a settled database would be: statistics, and the visibility map set (VACUUM), so that the fan-out
    # and preference reads are index-only scans, as autovacuum makes them in production.
    conn.execute("VACUUM ANALYZE" if conn.autocommit else "ANALYZE")
    summary = (f"seeded {spec.users:,} users, {spec.users * spec.favorites_per_user:,} favorites over "
               f"{spec.entities:,} entities, {spec.triggers:,} pending triggers"
               f" ({spec.triggers // spec.urgent_every:,} urgent), {spec.done_triggers:,} done"
               + (f", {spec.users // spec.email_every:,} email channels" if spec.email_every else ""))
    log.info(summary)
    return summary
