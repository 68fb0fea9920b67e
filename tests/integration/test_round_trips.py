"""Round trips per batch are a constant, not a function of users or triggers (counted, not timed)."""

from __future__ import annotations

from herald import claiming
from herald.claiming import ClaimRequest
from herald.instrument import CountingRedis, StatementCounter
from herald.processing import process_batch
from tests import factories as f


def _batch_costs(db_url, redis_url, settings, pg, users: int, run_id: str) -> tuple[int, int, int]:
    first = pg.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0] + 1
    ids = range(first, first + users)
    f.add_users(pg, ids)
    entity = ("item", first)
    f.add_favorites(pg, ids, *entity)
    for user_id in list(ids)[::10]:
        f.disable(pg, user_id, "back_in_stock")
    for i in range(3):
        f.add_trigger(pg, "back_in_stock", entity=entity, payload={"item_name": f"i{i}"})
    f.add_trigger(pg, "security_alert", user_id=first, payload={"message": "m"})
    batches = claiming.claim(pg, ClaimRequest(run_id), settings)
    assert len(batches) == 1
    counter = StatementCounter()
    client = CountingRedis.from_url(redis_url)
    with counter.connect(db_url, autocommit=True) as conn:
        result = process_batch(conn, client, batches[0], settings)
    assert result.recipients == 3 * users + 1
    return counter.statements, client.round_trips, result.delivered


def test_same_statements_and_round_trips_for_100_and_2000_users(db_url, redis_url, pg, redis_client, settings):
    small = _batch_costs(db_url, redis_url, settings, pg, 100, "small")
    large = _batch_costs(db_url, redis_url, settings, pg, 2_000, "large")
    assert small[2] < large[2]  # really more work in the large batch
    assert small[:2] == large[:2], f"statements/round trips: 100 users {small[:2]}, 2,000 users {large[:2]}"
    assert small[0] <= 10 and small[1] <= 4
