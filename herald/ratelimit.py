"""The per-user sliding-window rate limit: a Redis Lua script for a whole batch, or PostgreSQL counts.

Every notification a user receives (normal, urgent, digest) counts; a normal one goes out only while
the user received fewer than ``limit`` in the window; an urgent one always goes out.

In Redis each user has a sorted set of the notifications counted for them, the member naming what it
counts (``t:<trigger_id>`` or ``d:<trigger_id>`` for a digest). A retried batch presents the same
members, which are recognised and allowed again without being counted twice. The script also takes,
per user, the count PostgreSQL sees in the window, and uses the larger of the two, so a Redis that
lost its data (restart, eviction) never lets a user past the limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from herald.config import Settings

# KEYS: one sorted set per user. ARGV: window_ms, limit, dry_run, then per key: floor, n, and n pairs
# (member, urgent). Returns one 0/1 per candidate, in order.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local dry = ARGV[3] == '1'
local out = {}
local a = 4
for _, key in ipairs(KEYS) do
  local floor = tonumber(ARGV[a])
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  if not dry then redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window) end
  local used = redis.call('ZCOUNT', key, now - window, '+inf')
  if floor > used then used = floor end
  local added = false
  for _ = 1, n do
    local member = ARGV[a]
    local urgent = ARGV[a + 1] == '1'
    a = a + 2
    if redis.call('ZSCORE', key, member) then
      out[#out + 1] = 1
    elseif urgent or used < limit then
      out[#out + 1] = 1
      used = used + 1
      if not dry then
        redis.call('ZADD', key, now, member)
        added = true
      end
    else
      out[#out + 1] = 0
    end
  end
  if added then redis.call('PEXPIRE', key, window) end
end
return out
"""


@dataclass(frozen=True)
class Candidate:
    user_id: int
    member: str  # what this notification is, stable across retries: "t:<trigger_id>", "d:<trigger_id>"
    urgent: bool


def redis_decide(
    client: redis.Redis,
    candidates: Sequence[Candidate],
    floors: Mapping[int, int],
    settings: Settings,
    *,
    dry_run: bool = False,
) -> list[bool]:
    """Decide (and count) all candidates atomically in one EVAL; raises ``redis.RedisError``."""
    if not candidates:
        return []
    by_user: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        by_user.setdefault(c.user_id, []).append(i)
    keys: list[str] = []
    args: list[object] = [settings.rate_window_seconds * 1000, settings.rate_limit, int(dry_run)]
    order: list[int] = []
    for user_id, indexes in by_user.items():
        keys.append(f"{settings.cache_namespace}:rl:{user_id}")
        args += [floors.get(user_id, 0), len(indexes)]
        for i in indexes:
            args += [candidates[i].member, int(candidates[i].urgent)]
            order.append(i)
    flags = client.eval(_LUA, len(keys), *keys, *args)
    allowed = [False] * len(candidates)
    for i, flag in zip(order, flags):
        allowed[i] = bool(flag)
    return allowed


def counts_decide(candidates: Sequence[Candidate], recent: Mapping[int, int], limit: int) -> list[bool]:
    """The same rule from PostgreSQL's counts (Redis down): pure, in candidate order."""
    used = dict(recent)
    allowed = []
    for c in candidates:
        ok = c.urgent or used.get(c.user_id, 0) < limit
        if ok:
            used[c.user_id] = used.get(c.user_id, 0) + 1
        allowed.append(ok)
    return allowed
