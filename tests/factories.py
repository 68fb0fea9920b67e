"""Small helpers that write contract rows the way the application would (plain SQL, real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def add_users(conn: psycopg.Connection, ids: Iterable[int]) -> None:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO users (id, email) VALUES (%s, %s)", [(i, f"user{i}@example.test") for i in ids])


def add_favorites(conn: psycopg.Connection, user_ids: Iterable[int], entity_type: str, entity_id: int) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO user_favorites (user_id, entity_type, entity_id) VALUES (%s, %s, %s)",
            [(u, entity_type, entity_id) for u in user_ids],
        )


def disable(conn: psycopg.Connection, user_id: int, notification_type: str) -> None:
    conn.execute(
        "INSERT INTO user_notification_preferences (user_id, notification_type, enabled) VALUES (%s, %s, false)",
        (user_id, notification_type),
    )


def add_trigger(
    conn: psycopg.Connection,
    trigger_type: str = "price_drop",
    *,
    entity: tuple[str, int] | None = None,
    user_id: int | None = None,
    priority: str = "normal",
    payload: dict[str, Any] | None = None,
    created_at: str | None = None,
) -> int:
    if payload is None:
        payload = {"item_name": "Lamp", "old_price": "40", "new_price": "30", "event_name": "Gig",
                   "starts_at": "20:00", "message": "New login"}
    row = conn.execute(
        "INSERT INTO notification_triggers (trigger_type, entity_type, entity_id, user_id, priority, payload,"
        " created_at) VALUES (%s, %s, %s, %s, %s, %s, coalesce(%s::timestamptz, now())) RETURNING id",
        (trigger_type, entity[0] if entity else None, entity[1] if entity else None, user_id, priority,
         Jsonb(payload), created_at),
    ).fetchone()
    return row[0]


def trigger(conn: psycopg.Connection, trigger_id: int) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM notification_triggers WHERE id = %s", (trigger_id,))
    names = [d.name for d in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def notifications_of(conn: psycopg.Connection, trigger_id: int) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT user_id FROM notifications WHERE trigger_id = %s ORDER BY user_id", (trigger_id,))]


def outcomes_of(conn: psycopg.Connection, trigger_id: int) -> dict[int, str]:
    return dict(conn.execute(
        "SELECT user_id, outcome FROM trigger_recipient_outcomes WHERE trigger_id = %s", (trigger_id,)).fetchall())
