"""Redis cache of who favorited an entity and what each user disabled, read and written per batch.

Keys are namespaced and versioned (``<namespace>:fav:<entity_type>:<entity_id>``,
``<namespace>:pref:<user_id>``; the namespace holds the format version, ``herald:v1`` by default) and
each holds exactly one entity's or one user's data, so a hit can never return another user's data.
A whole batch costs two reads and one pipelined write, one round trip each. A read is cut into MGETs
of at most ``MGET_CHUNK`` keys sent in one pipeline, so no single command holds Redis for long (a few
milliseconds of server time at most, whatever the batch size). On a Redis Cluster (the
``notifications_redis`` connection's extra ``{"cluster": true}``) the same calls go through
redis-py's cluster client: reads are split by hash slot (``mget_nonatomic``) and writes pipelined per
node; no call needs two of a batch's keys in one slot. When Redis fails, the cache switches itself off
for the rest of the batch and the caller reads PostgreSQL instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import redis
import redis.cluster

from herald.config import Settings

log = logging.getLogger(__name__)

Entity = tuple[str, int]

#: Keys per MGET. SLOWLOG at 100x W1 on this 2-core machine, Redis sharing the cores with PostgreSQL and
#: two batches: 17 to 41 ms per 10,000-key MGET (a millisecond or two on a quiet server), hence 2,000:
#: a few milliseconds each. They go in one pipeline, so the round trips stay the same.
MGET_CHUNK = 2_000

#: Lifetime of the hit/miss counters (``<namespace>:stats:*``), renewed by every batch that counts:
#: like every herald key, they expire when herald stops writing them.
STATS_TTL_SECONDS = 7 * 24 * 3600

#: Marks a cached preferences value (a JSON list of disabled types follows); the user exists
#: (non-existent users are never cached). JSON, not a joined string: a type name may hold a comma.
_PREF_PREFIX = b"u:"


class RecipientCache:
    def __init__(self, client: redis.Redis | None, settings: Settings, *, read_only: bool = False) -> None:
        self.client = client
        self.settings = settings
        self.read_only = read_only  # a dry run reads the cache but writes nothing to it
        self.available = client is not None
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------------------------------- keys
    def favorites_key(self, entity: Entity) -> str:
        return f"{self.settings.cache_namespace}:fav:{entity[0]}:{entity[1]}"

    def preferences_key(self, user_id: int) -> str:
        return f"{self.settings.cache_namespace}:pref:{user_id}"

    def stats_key(self, name: str) -> str:
        return f"{self.settings.cache_namespace}:stats:{name}"

    # ---------------------------------------------------------------------------------------- reads
    def favorites(self, entities: list[Entity]) -> dict[Entity, list[int]]:
        """Cached recipients of the entities found in the cache (misses are left out)."""
        values = self._mget([self.favorites_key(e) for e in entities])
        found = {e: _decode_ids(v) for e, v in zip(entities, values, strict=True) if v is not None}
        self._count(len(found), len(entities) - len(found))
        return found

    def preferences(self, user_ids: list[int]) -> dict[int, frozenset[str]]:
        """Cached disabled types of the users found in the cache (misses are left out)."""
        values = self._mget([self.preferences_key(u) for u in user_ids])
        # Most users share one of a few values ("nothing disabled" above all): decode each value once.
        decoded: dict[bytes, frozenset[str]] = {}
        found: dict[int, frozenset[str]] = {}
        for u, v in zip(user_ids, values, strict=True):
            if v is not None:
                disabled = decoded.get(v)
                if disabled is None:
                    disabled = decoded[v] = frozenset(json.loads(v[len(_PREF_PREFIX):]))
                found[u] = disabled
        self._count(len(found), len(user_ids) - len(found))
        return found

    # ---------------------------------------------------------------------------------------- write
    def store(self, favorites: Mapping[Entity, Iterable[int]], preferences: Mapping[int, Iterable[str]]) -> None:
        """Write what was read from PostgreSQL, and the hit/miss counters, in one round trip."""
        if self.read_only or not self.available or not (favorites or preferences or self.hits or self.misses):
            return
        pipe = self.client.pipeline(transaction=False)
        fav = [(self.favorites_key(e), ",".join(map(str, users))) for e, users in favorites.items()]
        encoded: dict[frozenset[str], str] = {}  # most users share one of a few values
        pref = [(self.preferences_key(u), encoded.get(d) or encoded.setdefault(
            frozenset(d), _PREF_PREFIX.decode() + json.dumps(sorted(d)))) for u, d in preferences.items()]
        _set_many(pipe, fav, self.settings.favorites_ttl_seconds)
        _set_many(pipe, pref, self.settings.preferences_ttl_seconds)
        for name, n in (("cache_hits", self.hits), ("cache_misses", self.misses)):
            if n:
                pipe.incrby(self.stats_key(name), n)
                pipe.expire(self.stats_key(name), STATS_TTL_SECONDS)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._down(exc)

    # ---------------------------------------------------------------------------------------- helpers
    def _mget(self, keys: list[str]) -> list[bytes | None]:
        if not self.available or not keys:
            return [None] * len(keys)
        try:
            return mget(self.client, keys)
        except redis.RedisError as exc:
            self._down(exc)
            return [None] * len(keys)

    def _count(self, hits: int, misses: int) -> None:
        if self.available:
            self.hits += hits
            self.misses += misses

    def _down(self, exc: Exception) -> None:
        if self.available:
            log.warning("Redis cache unavailable (%s); reading PostgreSQL for the rest of this batch",
                        type(exc).__name__)
        self.available = False


#: SET with EX for up to SET_CHUNK keys in one call (one server: far cheaper for the client than one
#: pipelined SET per key, and about a millisecond of server time per call).
_SET_MANY = """
local ttl = ARGV[1]
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl) end
return #KEYS
"""
SET_CHUNK = 1_000


def _set_many(pipe: Any, items: list[tuple[str, str]], ttl: int) -> None:
    """Queue ``SET key value EX ttl`` for every item on ``pipe``: in chunked scripts on one server, as
    single SETs on a cluster (a script may only touch keys of one slot there)."""
    if isinstance(pipe, redis.cluster.ClusterPipeline):
        for key, value in items:
            pipe.set(key, value, ex=ttl)
        return
    for i in range(0, len(items), SET_CHUNK):
        chunk = items[i:i + SET_CHUNK]
        pipe.eval(_SET_MANY, len(chunk), *(k for k, _ in chunk), ttl, *(v for _, v in chunk))


def mget(client: redis.Redis | redis.RedisCluster, keys: list[str]) -> list[bytes | None]:
    """The values of ``keys`` in one round trip (per node on a cluster), in MGETs of ``MGET_CHUNK`` keys."""
    chunks = [keys[i:i + MGET_CHUNK] for i in range(0, len(keys), MGET_CHUNK)]
    if isinstance(client, redis.RedisCluster):
        return [v for chunk in chunks for v in client.mget_nonatomic(chunk)]
    pipe = client.pipeline(transaction=False)
    for chunk in chunks:
        pipe.mget(chunk)
    return [v for values in pipe.execute() for v in values]


def _decode_ids(value: bytes) -> list[int]:
    return [int(x) for x in value.split(b",")] if value else []
