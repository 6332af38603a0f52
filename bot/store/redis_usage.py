"""Token usage and usage limits in Redis (see `bot.usage`), used by `RedisStore`.

Layout: a server's counters share the hash tag `{usage:<server>}`, so the limit check, which
reads and writes several of them, is one script in one slot; a session's totals live beside
the session, in its scope's slot:

    {prefix}:{usage:<server>}:day:<YYYY-MM-DD>  hash    in, out, est (tokens estimated),
                                                       u:<user> and s:<scope>:<session>
                                                       (tokens); expires after 40 days
    {prefix}:{usage:<server>}:rate:<user>       zset    message id -> when it was admitted
                                                       (ms); the last minute's, expiring
    {prefix}:{usage:<server>}:notice:<user>     string  until when (ms) a member over a limit
                                                       is not told again
    {prefix}:{<scope>}:usage                    hash    <session>:in, :out, :est (tokens),
                                                       :charged (the token of the last turn
                                                       its save charged, so a repeated save
                                                       charges once); with a TTL, expires
                                                       with the place
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from bot.store.base import StorePolicy
from bot.usage import (
    NOTICE_SECONDS,
    RATE_WINDOW_SECONDS,
    TOP_USERS_SHOWN,
    USAGE_DAYS_KEPT,
    Admission,
    Charge,
    Refusal,
    ServerUsage,
    SessionUsage,
    Totals,
    next_day_at,
)

# KEYS: the day hash, the member's rate log, the member's notice key. ARGV: now (ms), user,
# message id, messages per minute, user and server tokens per day, window (ms), when the day
# ends (ms), notice pause (ms). Budgets first (a refused message is not charged to the rate),
# then the rate: a message already in the log was admitted before (by another process).
# A counter of the wrong type is junk and starts again from nothing.
ADMIT = """
local day, rate, notice = KEYS[1], KEYS[2], KEYS[3]
for _, k in ipairs({{day, 'hash'}, {rate, 'zset'}, {notice, 'string'}}) do
  local found = redis.call('TYPE', k[1]).ok
  if found ~= 'none' and found ~= k[2] then redis.call('DEL', k[1]) end
end
local now, user, message = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local per_minute, user_budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local server_budget, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local refused, until_ms = nil, 0
if server_budget > 0 then
  local used = redis.call('HMGET', day, 'in', 'out')
  if (tonumber(used[1]) or 0) + (tonumber(used[2]) or 0) >= server_budget then
    refused, until_ms = 'server', tonumber(ARGV[8])
  end
end
if not refused and user_budget > 0 then
  if (tonumber(redis.call('HGET', day, 'u:' .. user)) or 0) >= user_budget then
    refused, until_ms = 'user', tonumber(ARGV[8])
  end
end
if not refused and per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - window)
  if not redis.call('ZSCORE', rate, message) then
    if redis.call('ZCARD', rate) >= per_minute then
      local oldest = redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')
      refused, until_ms = 'rate', tonumber(oldest[2]) + window
    else
      redis.call('ZADD', rate, now, message)
      redis.call('PEXPIRE', rate, window)
    end
  end
end
if not refused then return {'ok'} end
local pause = tonumber(ARGV[9])
local told = tonumber(redis.call('GET', notice))
if told and told > now then return {refused, tostring(until_ms), 0} end
redis.call('SET', notice, tostring(now + pause), 'PX', pause)
return {refused, tostring(until_ms), 1}
"""

# KEYS[1]: a hash of counters. ARGV: its expiry in seconds (0: none), then field, amount
# pairs to add. A key of the wrong type is junk and starts again from nothing.
ADD = """
local found = redis.call('TYPE', KEYS[1]).ok
if found ~= 'none' and found ~= 'hash' then redis.call('DEL', KEYS[1]) end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
"""

# KEYS: the day hashes, today first. ARGV[1]: how many days count as today (1), ARGV[2]: how
# many top users. Returns today's in, out, est, the period's in, out, est, then user, tokens
# pairs, most first.
SERVER_USAGE = """
local totals = {0, 0, 0, 0, 0, 0}
local users, names = {}, {}
for i, k in ipairs(KEYS) do
  if redis.call('TYPE', k).ok == 'hash' then
    local flat = redis.call('HGETALL', k)
    for j = 1, #flat, 2 do
      local field, value = flat[j], tonumber(flat[j + 1]) or 0
      local slot = ({['in'] = 1, out = 2, est = 3})[field]
      if slot then
        if i <= tonumber(ARGV[1]) then totals[slot] = totals[slot] + value end
        totals[slot + 3] = totals[slot + 3] + value
      elseif string.sub(field, 1, 2) == 'u:' then
        local user = string.sub(field, 3)
        if not users[user] then table.insert(names, user) users[user] = 0 end
        users[user] = users[user] + value
      end
    end
  end
end
table.sort(names, function(a, b)
  if users[a] ~= users[b] then return users[a] > users[b] end
  return a < b
end)
local reply = {}
for i = 1, 6 do reply[i] = tostring(totals[i]) end
for i = 1, math.min(#names, tonumber(ARGV[2])) do
  table.insert(reply, names[i])
  table.insert(reply, tostring(users[names[i]]))
end
return reply
"""


class RedisUsage:
    """The usage half of `RedisStore`; its caller wraps each call as a store call."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        policy: StorePolicy,
        usage_key: Callable[[str, str], str],
        scope_key: Callable[[str, str], str],
        register: Callable[[str], Any],
    ) -> None:
        """`usage_key(server, part)` and `scope_key(scope, part)` build the keys, and
        `register(source)` makes a script callable as `script(keys=..., args=...)`, the
        store's way (`redis`)."""
        self._redis = client
        self._policy = policy
        self._key = usage_key
        self._scope_key = scope_key
        self._admit = register(ADMIT)
        self._add = register(ADD)
        self._server_usage = register(SERVER_USAGE)

    async def admit(self, admission: Admission) -> Refusal | None:
        account, limits = admission.account, admission.limits
        server, user = account.server, account.user
        keys = [
            self._key(server, f"day:{admission.day}"),
            self._key(server, f"rate:{user}"),
            self._key(server, f"notice:{user}"),
        ]
        now_ms = int(admission.now * 1000)
        args: list[Any] = [now_ms, user, admission.message, limits.messages_per_minute]
        args += [limits.user_tokens_per_day, limits.server_tokens_per_day]
        args += [RATE_WINDOW_SECONDS * 1000, int(next_day_at(admission.now) * 1000)]
        args.append(NOTICE_SECONDS * 1000)
        reply = await self._admit(keys=keys, args=args)
        if reply[0] == "ok":
            return None
        return Refusal(str(reply[0]), int(reply[1]) / 1000, bool(int(reply[2])))

    async def record(self, charge: Charge, *, session: bool = True) -> None:
        """Two scripts, one per slot (the server's day, the session's totals), so each runs
        whole on its node of a Redis Cluster; a turn's save adds the session's (then
        `session` is False)."""
        usage, account = charge.usage, charge.account
        estimated = usage.estimated_tokens
        day = self._key(account.server, f"day:{charge.day}")
        await self._add(
            keys=[day],
            args=[
                USAGE_DAYS_KEPT * 86_400,
                *("in", usage.input_tokens, "out", usage.output_tokens, "est", estimated),
                *(f"u:{account.user}", usage.total),
                *(f"s:{charge.scope}:{charge.session}", usage.total),
            ],
        )
        if not session:
            return
        name = charge.session
        await self._add(
            keys=[self._scope_key(charge.scope, "usage")],
            args=[
                self._policy.ttl_seconds,
                *(f"{name}:in", usage.input_tokens, f"{name}:out", usage.output_tokens),
                *(f"{name}:est", estimated),
            ],
        )

    async def session_usage(self, scope: str, name: str, server: str, day: str) -> SessionUsage:
        async with self._redis.pipeline(transaction=False) as reads:
            fields = [f"{name}:in", f"{name}:out", f"{name}:est"]
            reads.hmget(self._scope_key(scope, "usage"), fields)
            reads.hmget(self._key(server, f"day:{day}"), [f"s:{scope}:{name}", "in", "out"])
            (tokens_in, tokens_out, est), (today, day_in, day_out) = await reads.execute()
        return SessionUsage(
            _int(tokens_in), _int(tokens_out), _int(est), _int(today), _int(day_in) + _int(day_out)
        )

    async def server_usage(self, server: str, days: list[str]) -> ServerUsage:
        keys = [self._key(server, f"day:{day}") for day in days]
        reply = await self._server_usage(keys=keys, args=[1, TOP_USERS_SHOWN])
        counts = [int(value) for value in reply[:6]]
        rest = reply[6:]
        top = [(str(rest[i]), int(rest[i + 1])) for i in range(0, len(rest), 2)]
        return ServerUsage(Totals(*counts[:3]), Totals(*counts[3:]), top)


def _int(value: object) -> int:
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:  # junk in a counter reads as nothing counted
        return 0
