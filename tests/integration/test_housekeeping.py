"""Housekeeping against real PostgreSQL and Redis."""

from __future__ import annotations

from herald import claiming, housekeeping
from herald.claiming import ClaimRequest
from tests import factories as f


def test_housekeeping_releases_expired_claims_purges_old_records_and_trims_redis(pg, redis_client, settings):
    f.add_users(pg, [1])
    t = f.add_trigger(pg, "back_in_stock", user_id=1, payload={"item_name": "x"})
    claiming.claim(pg, ClaimRequest("dead-run"), settings)
    pg.execute("UPDATE notification_triggers SET claim_expires_at = now() - interval '1 minute'")
    pg.execute("INSERT INTO notification_outcomes (trigger_id, user_id, outcome, created_at) VALUES"
               " (900, 1, 'skipped_preference', now() - interval '40 days'),"
               " (901, 1, 'skipped_preference', now() - interval '1 day')")
    pg.execute("INSERT INTO herald_runs (run_id, started_at) VALUES ('ancient', now() - interval '40 days'),"
               " ('recent', now())")
    key = f"{settings.cache_namespace}:rl:1"
    now_ms = int(redis_client.time()[0]) * 1000
    redis_client.zadd(key, {"t:old": now_ms - 2 * 3600 * 1000, "t:new": now_ms})
    orphan = f"{settings.cache_namespace}:pref:77"
    redis_client.set(orphan, "u:[]")  # no TTL

    done = housekeeping.run(pg, redis_client, settings)

    row = f.trigger(pg, t)
    assert row["claimed_by"] is None and row["status"] == "pending"
    assert done["expired_claims_released"] == 1
    assert [r[0] for r in pg.execute("SELECT trigger_id FROM notification_outcomes")] == [901]
    assert sorted(r[0] for r in pg.execute("SELECT run_id FROM herald_runs")) == ["dead-run", "recent"]
    assert redis_client.zrange(key, 0, -1) == [b"t:new"]
    assert 0 < redis_client.ttl(orphan) <= settings.preferences_ttl_seconds
