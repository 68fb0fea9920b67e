from __future__ import annotations

import threading

import pytest

from herald import db, services

CONTRACT_COLUMNS = {
    "users": {"id", "email", "timezone", "created_at"},
    "user_favorites": {"user_id", "entity_type", "entity_id", "created_at"},
    "user_notification_preferences": {"user_id", "notification_type", "enabled"},
    "notification_triggers": {
        "id", "trigger_type", "entity_type", "entity_id", "user_id", "priority", "payload", "status",
        "created_at", "processed_at", "last_error",
    },
    "notifications": {
        "id", "user_id", "trigger_id", "notification_type", "title", "body", "payload", "priority",
        "created_at", "read_at",
    },
}


@pytest.fixture
def empty_db(found_services):
    name = "herald_test_migrate"
    url = services.create_database(found_services.database_url, name, drop_first=True)
    yield url
    services.drop_database(found_services.database_url, name)


def test_migrate_creates_every_contract_column_and_is_idempotent(empty_db):
    with db.connection(empty_db) as conn:
        applied = db.migrate(conn)
        assert applied == [m.version for m in db.available_migrations()]
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
        ).fetchall()
        columns: dict[str, set[str]] = {}
        for table, column in rows:
            columns.setdefault(table, set()).add(column)
        for table, expected in CONTRACT_COLUMNS.items():
            assert expected <= columns.get(table, set()), f"{table} lacks {expected - columns.get(table, set())}"
        unique = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'notifications_trigger_user_key'"
        ).fetchone()
        assert unique and "UNIQUE" in unique[0] and "(trigger_id, user_id)" in unique[0]
        before = conn.execute("SELECT version, applied_at FROM herald_schema_migrations ORDER BY 1").fetchall()
        assert db.migrate(conn) == []
        after = conn.execute("SELECT version, applied_at FROM herald_schema_migrations ORDER BY 1").fetchall()
        assert before == after


def test_two_concurrent_migrations_both_succeed(empty_db):
    results: list[object] = []

    def run() -> None:
        try:
            with db.connection(empty_db) as conn:
                results.append(db.migrate(conn))
        except Exception as exc:  # recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not [r for r in results if isinstance(r, Exception)], results
    applied = sorted(results, key=len)
    assert applied[0] == [] and applied[1] == [m.version for m in db.available_migrations()]


def test_changed_applied_migration_is_refused(empty_db, tmp_path):
    for m in db.available_migrations():
        (tmp_path / m.path.name).write_text(m.text)
    with db.connection(empty_db) as conn:
        db.migrate(conn, tmp_path)
        first = sorted(tmp_path.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(db.MigrationError, match=first.name):
            db.migrate(conn, tmp_path)
