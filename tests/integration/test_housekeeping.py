"""Housekeeping against real PostgreSQL and Redis."""

from __future__ import annotations

from herald import claiming, housekeeping
from herald.claiming import ClaimRequest
from tests import factories as f


def test_housekeeping_releases_expired_claims_purges_old_records_and_expires_redis_keys(pg, redis_client, settings):
    f.add_users(pg, [1])
    t = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "x"})
    claiming.claim(pg, ClaimRequest("dead-run"), settings)
    pg.execute("UPDATE notification_triggers SET claim_expires_at = now() - interval '1 minute'")
    pg.execute("INSERT INTO notification_outcomes (trigger_id, user_id, outcome, created_at) VALUES"
               " (900, 1, 'skipped_preference', now() - interval '40 days'),"
               " (901, 1, 'skipped_preference', now() - interval '1 day'),"
               " (902, 1, 'digested', now() - interval '40 days')")
    pg.execute("INSERT INTO notification_deliveries (notification_id, user_id, channel, address, status, created_at)"
               " VALUES (1, 1, 'email', 'a@x.test', 'sent', now() - interval '40 days'),"
               " (2, 1, 'email', 'a@x.test', 'failed', now() - interval '40 days'),"
               " (3, 1, 'email', 'a@x.test', 'pending', now() - interval '40 days'),"  # still owed: kept
               " (4, 1, 'email', 'a@x.test', 'sent', now() - interval '1 day')")
    pg.execute("INSERT INTO herald_runs (run_id, started_at) VALUES ('ancient', now() - interval '40 days'),"
               " ('recent', now())")
    orphans = {f"{settings.cache_namespace}:pref:77": settings.preferences_ttl_seconds,
               f"{settings.cache_namespace}:stats:cache_hits": 7 * 24 * 3600,
               f"{settings.cache_namespace}:rl:1": settings.rate_window_seconds}  # left by herald before 0.2
    for key in orphans:
        redis_client.set(key, "1")  # no TTL

    done = housekeeping.run(pg, redis_client, settings)

    row = f.trigger(pg, t)
    assert row["claimed_by"] is None and row["status"] == "pending"
    assert done["expired_claims_released"] == 1
    assert [r[0] for r in pg.execute("SELECT trigger_id FROM notification_outcomes")] == [901]
    assert sorted(r[0] for r in pg.execute("SELECT run_id FROM herald_runs")) == ["dead-run", "recent"]
    assert sorted(r[0] for r in pg.execute("SELECT notification_id FROM notification_deliveries")) == [3, 4]
    assert done["old_deliveries_purged"] == 2
    for key, ttl in orphans.items():
        assert 0 < redis_client.ttl(key) <= ttl, key
    assert done["redis_keys_fixed"] == 3


def test_purge_never_deletes_a_held_notification(pg, redis_client, settings):
    """A rate-limited outcome is owed to its user (their digest): however old, it is kept until a
    digest folds it. Here the user is still over the limit, so no digest can go out yet."""
    f.add_users(pg, [1])
    pg.execute("INSERT INTO notifications (user_id, notification_type, title, body, priority)"
               " SELECT 1, 'price_drop', 't', 'b', 'normal' FROM generate_series(1, %s)", (settings.rate_limit,))
    pg.execute("INSERT INTO notification_outcomes (trigger_id, user_id, outcome, reason, created_at) VALUES"
               " (900, 1, 'rate_limited', 'over the per-user rate limit', now() - interval '40 days')")
    done = housekeeping.run(pg, redis_client, settings)
    assert done["old_outcomes_purged"] == 0 and done["digests_sent"] == 0
    assert pg.execute("SELECT outcome FROM notification_outcomes").fetchall() == [("rate_limited",)]
