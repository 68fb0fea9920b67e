"""The per-user sliding-window rate limit: a Redis Lua script for a whole batch, or PostgreSQL counts.

Every notification a user receives (normal, urgent, digest) counts; a normal one goes out only while
the user received fewer than ``limit`` in the window; an urgent one always goes out.

In Redis each user has a sorted set of the notifications counted for them, the member naming what it
counts (``t:<trigger_id>`` or ``d:<trigger_id>`` for a digest). A retried batch presents the same
members, which are recognised and allowed again without being counted twice. Entries older than
the window are ignored by the count and trimmed by housekeeping (``trim``). The script also takes,
per user, the count PostgreSQL sees in the window, and uses the larger of the two, so a Redis that
lost its data (restart, eviction) never lets a user past the limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import redis

from herald.config import Settings

# KEYS[1]: this attempt's marker (see redis_decide); KEYS[2..]: one sorted set per user.
# ARGV: window_ms, limit, dry_run, check (1: look for members counted before; 0: only when the
# marker shows an earlier attempt of this batch), then per user key: floor, the members joined by
# spaces, and their urgent flags as a string of 0/1. Returns one string of 0/1, the decisions in
# the same order. Compact arguments and a single reply keep the client's cost small.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local dry = ARGV[3] == '1'
local check = ARGV[4] == '1' or redis.call('EXISTS', KEYS[1]) == 1
local out = {}
for k = 2, #KEYS do
  local key = KEYS[k]
  local a = 5 + (k - 2) * 3
  local floor = tonumber(ARGV[a])
  local urgent = ARGV[a + 2]
  local members = {}
  for member in string.gmatch(ARGV[a + 1], '%S+') do members[#members + 1] = member end
  -- Entries older than the window no longer count; they are trimmed by housekeeping (and the key
  -- expires a window after its last entry), which keeps this loop to a few calls per user.
  local used = redis.call('ZCOUNT', key, now - window, '+inf')
  -- Members counted by an earlier attempt are allowed again, not counted twice.
  local known = {}
  if check and used > 0 then
    for first = 1, #members, 1000 do
      local last = math.min(first + 999, #members)
      local scores = redis.call('ZMSCORE', key, unpack(members, first, last))
      for j = first, last do known[j] = scores[j - first + 1] end
    end
  end
  if floor > used then used = floor end
  local adds = {}
  for i, member in ipairs(members) do
    if known[i] then
      out[#out + 1] = '1'
    elseif string.byte(urgent, i) == 49 or used < limit then
      out[#out + 1] = '1'
      used = used + 1
      adds[#adds + 1] = now
      adds[#adds + 1] = member
    else
      out[#out + 1] = '0'
    end
  end
  if #adds > 0 and not dry then
    for first = 1, #adds, 2000 do
      redis.call('ZADD', key, unpack(adds, first, math.min(first + 1999, #adds)))
    end
    redis.call('PEXPIRE', key, window)
  end
end
if not dry then redis.call('SET', KEYS[1], '1', 'PX', window) end
return table.concat(out)
"""


class Candidate(NamedTuple):  # a tuple: batches make tens of thousands of them
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
    attempt: str | None = None,
    maybe_counted: bool = True,
) -> list[bool]:
    """Decide (and count) all candidates atomically in one EVAL; raises ``redis.RedisError``.

    Looking up whether each member was counted before costs a call per user, so it is skipped when
    nothing can have been: ``attempt`` names this unit of work (a batch), the script leaves a marker
    for it, and ``maybe_counted=False`` says no candidate was claimed before (first claim of every
    trigger). A retry of the same batch finds its marker and checks; a trigger claimed again by
    another run comes with ``maybe_counted=True``.
    """
    if not candidates:
        return []
    by_user: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        by_user.setdefault(c.user_id, []).append(i)
    check = maybe_counted or attempt is None
    keys: list[str] = [f"{settings.cache_namespace}:attempt:{attempt or '-'}"]
    args: list[object] = [settings.rate_window_seconds * 1000, settings.rate_limit, int(dry_run), int(check)]
    order: list[int] = []
    for user_id, indexes in by_user.items():
        keys.append(f"{settings.cache_namespace}:rl:{user_id}")
        args += [
            floors.get(user_id, 0),
            " ".join(candidates[i].member for i in indexes),
            "".join("1" if candidates[i].urgent else "0" for i in indexes),
        ]
        order.extend(indexes)
    flags = client.eval(_LUA, len(keys), *keys, *args)
    flags = flags.decode() if isinstance(flags, bytes) else flags
    allowed = [False] * len(candidates)
    for i, flag in zip(order, flags, strict=True):
        allowed[i] = flag == "1"
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


def trim(client: redis.Redis, settings: Settings) -> int:
    """Drop entries older than the window from every rate-limit key (housekeeping); return keys seen."""
    cutoff = f"({int(client.time()[0] * 1000) - settings.rate_window_seconds * 1000}"
    seen = 0
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=f"{settings.cache_namespace}:rl:*", count=1000):
        pipe.zremrangebyscore(key, "-inf", cutoff)
        seen += 1
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
    return seen
