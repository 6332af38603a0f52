"""The production store: sessions in Redis, each operation one Lua script (one round trip).

Layout (every key of a scope shares the hash tag `{scope}`, so one script may touch the
scope and any of its sessions even on Redis Cluster):

    {prefix}:{scope}:state              hash    current -> session name; opt:{option} -> value
    {prefix}:{scope}:names              zset    session name -> last use (unix seconds)
    {prefix}:{scope}:queue              zset    waiting turns' places, in text order (score 0)
    {prefix}:{scope}:tickets            hash    place -> deadline (ms); a lapsed place is dropped
    {prefix}:{scope}:claim:{id}         string  a claimed message id, expiring after a day
    {prefix}:{scope}:s:{name}:meta      hash    model, mcp (JSON list), created, updated, format,
                                                last_turn (the last saved turn's token)
    {prefix}:{scope}:s:{name}:messages  list    one JSON message per element, oldest first
    {prefix}:{scope}:s:{name}:refs      hash    user ref (Discord message id) -> stored JSON
    {prefix}:{scope}:s:{name}:lock      string  token of the turn in progress, with expiry

The scripts build session keys from the scope prefix and the name, because the current
session's name is only known inside the script; `session_key` is the Python twin of `key()`
in `_PRELUDE` and the two must agree.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.errors import CorruptSession, InvalidInput, SessionBusy, StoreUnavailable, UnknownSession
from bot.store.base import (
    CLAIM_TTL_SECONDS,
    DEFAULT_SESSION,
    STORE_FORMAT,
    TICKET_TTL_MS,
    AlreadyClaimed,
    Message,
    SessionInfo,
    SessionSettings,
    StorePolicy,
    Ticket,
    Turn,
    decode_message_array,
    decode_messages,
    encode_message,
    mcp_json,
    session_info,
)

KEY_PREFIX = "dcbot"

ScriptArg = str | int | float
MAX_CONNECTIONS = 64
POOL_WAIT_SECONDS = 10
"""Beyond MAX_CONNECTIONS calls in flight, a call waits this long for a free connection
(redis-py's default pool raises at once, which a busy bot would report as an outage)."""


def scope_key(scope: str, part: str) -> str:
    """A scope-level key (`state` or `names`)."""
    if "{" in scope or "}" in scope:
        raise ValueError(f"scope ids cannot contain braces: {scope!r}")
    return f"{KEY_PREFIX}:{{{scope}}}:{part}"


def session_key(scope: str, name: str, part: str) -> str:
    """A session-level key (`meta`, `messages`, `refs` or `lock`)."""
    return scope_key(scope, f"s:{name}:{part}")


# Shared Lua: key building, lazy creation of the current session, and a session's summary.
# KEYS[1] is always the scope's state hash and KEYS[2] its names zset; ARGV[1] the key prefix
# of the scope (everything before "state").
_PRELUDE = """
local prefix = ARGV[1]
local function key(name, part) return prefix .. 's:' .. name .. ':' .. part end
local function create(name, model, mcp, now)
  redis.call('HSET', key(name, 'meta'), 'model', model, 'mcp', mcp,
             'created', now, 'updated', now, 'format', '$FORMAT')
  redis.call('ZADD', KEYS[2], now, name)
end
local function current_or_create(model, now)
  local name = redis.call('HGET', KEYS[1], 'current')
  if not name then
    name = '$DEFAULT'
    redis.call('HSET', KEYS[1], 'current', name)
  end
  if redis.call('EXISTS', key(name, 'meta')) == 0 then create(name, model, '[]', now) end
  return name
end
local function describe(name)
  local m = redis.call('HMGET', key(name, 'meta'), 'format', 'model', 'mcp', 'created', 'updated')
  return {name, m[1] or '', m[2] or '', m[3] or '', m[4] or '0', m[5] or '0',
          redis.call('LLEN', key(name, 'messages'))}
end
"""


def _lua(body: str) -> str:
    """A script: the prelude, then `body`, with the format and default session filled in."""
    script = _PRELUDE + body
    return script.replace("$FORMAT", STORE_FORMAT).replace("$DEFAULT", DEFAULT_SESSION)


# ARGV: prefix, token, lock_ms, budget_bytes, default_model, now, place, claim, claim_ttl,
# ticket_ttl_ms. Claim, then queue, then lock; only the first ticket of the queue may lock.
_BEGIN_TURN = _lua(
    """
local token, claim = ARGV[2], ARGV[8]
if claim ~= '' then
  local claimed = prefix .. 'claim:' .. claim
  local holder = redis.call('GET', claimed)
  if holder and holder ~= token then return {'claimed'} end
  if not holder then redis.call('SET', claimed, token, 'EX', ARGV[9]) end
end
local queue, tickets, place = prefix .. 'queue', prefix .. 'tickets', ARGV[7]
local clock = redis.call('TIME')
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
redis.call('ZADD', queue, 0, place)
redis.call('HSET', tickets, place, now_ms + tonumber(ARGV[10]))
local first = redis.call('ZRANGE', queue, 0, 0)[1]
while first ~= place and tonumber(redis.call('HGET', tickets, first) or '0') < now_ms do
  redis.call('ZREM', queue, first)
  redis.call('HDEL', tickets, first)
  first = redis.call('ZRANGE', queue, 0, 0)[1]
end
if first ~= place then return {'busy'} end
local function leave_queue()
  redis.call('ZREM', queue, place)
  redis.call('HDEL', tickets, place)
end
local name = current_or_create(ARGV[5], ARGV[6])
local info = describe(name)
if info[2] ~= '$FORMAT' then
  leave_queue()
  return {'corrupt', name}
end
local lock = key(name, 'lock')
if not redis.call('SET', lock, token, 'NX', 'PX', ARGV[3]) then return {'busy'} end
leave_queue()
local out = {'ok'}
for _, v in ipairs(info) do out[#out + 1] = v end
local messages, budget, used, stop = key(name, 'messages'), tonumber(ARGV[4]), 0, info[7]
local newest_first = {}
while stop > 0 do
  local start = math.max(stop - 64, 0)
  local page = redis.call('LRANGE', messages, start, stop - 1)
  for j = #page, 1, -1 do
    if used + #page[j] > budget then stop = 0 break end
    used = used + #page[j]
    newest_first[#newest_first + 1] = page[j]
  end
  stop = math.min(stop, start)
end
local oldest_first = {}
for i = #newest_first, 1, -1 do oldest_first[#oldest_first + 1] = newest_first[i] end
out[#out + 1] = used
-- One JSON array, not one reply element per message: parsing a long reply element by
-- element costs the client far more than one json.loads.
out[#out + 1] = '[' .. table.concat(oldest_first, ',') .. ']'
return out
"""
)

# ARGV: prefix, claim, claim_ttl
_CLAIM = _lua(
    """
return redis.call('SET', prefix .. 'claim:' .. ARGV[2], 'claimed', 'NX', 'EX', ARGV[3]) and 1 or 0
"""
)

# ARGV: prefix, name, token, history_cap, now, ttl_seconds, user_ref, message...
# Idempotent: the meta remembers the last saved turn's token, so a call repeated because its
# reply was lost (a timeout) saves nothing twice.
_FINISH_TURN = _lua(
    """
local name = ARGV[2]
local lock = key(name, 'lock')
local holder = redis.call('GET', lock)
if redis.call('HGET', key(name, 'meta'), 'last_turn') == ARGV[3] then return 1 end
if holder and holder ~= ARGV[3] then return 0 end
local cap = tonumber(ARGV[4])
if #ARGV > 7 then
  local messages = key(name, 'messages')
  redis.call('RPUSH', messages, unpack(ARGV, 8))
  redis.call('LTRIM', messages, -cap, -1)
  if ARGV[7] ~= '' then
    local refs = key(name, 'refs')
    if redis.call('HLEN', refs) >= cap then redis.call('DEL', refs) end
    redis.call('HSET', refs, ARGV[7], ARGV[8])
  end
  redis.call('HSET', key(name, 'meta'), 'updated', ARGV[5], 'last_turn', ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[5], name)
end
if holder then redis.call('DEL', lock) end
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  for _, k in ipairs({KEYS[1], KEYS[2], key(name, 'meta'), key(name, 'messages'),
                      key(name, 'refs')}) do
    redis.call('EXPIRE', k, ttl)
  end
end
return 1
"""
)

# ARGV: prefix, name, token, lock_ms
_EXTEND_LOCK = _lua(
    """
local lock = key(ARGV[2], 'lock')
if redis.call('GET', lock) ~= ARGV[3] then return 0 end
return redis.call('PEXPIRE', lock, ARGV[4])
"""
)

# ARGV: prefix
_DESCRIBE_CURRENT = _lua(
    """
local name = redis.call('HGET', KEYS[1], 'current') or '$DEFAULT'
return describe(name)
"""
)

# ARGV: prefix. Forgets names whose session expired.
_LIST = _lua(
    """
local out = {}
for _, name in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, -1)) do
  if redis.call('EXISTS', key(name, 'meta')) == 1 then
    for _, v in ipairs(describe(name)) do out[#out + 1] = v end
  else
    redis.call('ZREM', KEYS[2], name)
  end
end
return out
"""
)

# ARGV: prefix, name, model, mcp_json, now
_CREATE = _lua(
    """
if redis.call('EXISTS', key(ARGV[2], 'meta')) == 1 then return {} end
create(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], 'current', ARGV[2])
return describe(ARGV[2])
"""
)

# ARGV: prefix, name, now
_SWITCH = _lua(
    """
if redis.call('EXISTS', key(ARGV[2], 'meta')) == 0 then return {} end
redis.call('HSET', KEYS[1], 'current', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return describe(ARGV[2])
"""
)

# ARGV: prefix, default_model, now. Also the way out of an unreadable session: it rewrites
# the format marker and keeps the settings when they are readable.
_CLEAR = _lua(
    """
local name = current_or_create(ARGV[2], ARGV[3])
redis.call('DEL', key(name, 'messages'), key(name, 'refs'))
local meta = key(name, 'meta')
local readable, servers = pcall(cjson.decode, redis.call('HGET', meta, 'mcp') or '')
if redis.call('HGET', meta, 'format') ~= '$FORMAT' or not readable or type(servers) ~= 'table' then
  redis.call('DEL', meta)
  create(name, ARGV[2], '[]', ARGV[3])
end
redis.call('HSET', meta, 'updated', ARGV[3])
return describe(name)
"""
)

# ARGV: prefix, default_model, now, model, mcp_json
_UPDATE_SETTINGS = _lua(
    """
local name = current_or_create(ARGV[2], ARGV[3])
local info = describe(name)
if info[2] ~= '$FORMAT' then return info end
redis.call('HSET', key(name, 'meta'), 'model', ARGV[4], 'mcp', ARGV[5])
return describe(name)
"""
)

# ARGV: prefix, user_ref
_FORGET = _lua(
    """
for _, name in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local refs = key(name, 'refs')
  local stored = redis.call('HGET', refs, ARGV[2])
  if stored then
    redis.call('HDEL', refs, ARGV[2])
    return redis.call('LREM', key(name, 'messages'), -1, stored)
  end
end
return 0
"""
)

_SUMMARY_FIELDS = 7


class RedisStore:
    """Sessions in Redis. The client is injected; `from_url` builds (and then owns) one."""

    def __init__(self, client: aioredis.Redis, policy: StorePolicy, *, owns_client: bool = False):
        self._redis = client
        self._policy = policy
        self._owns_client = owns_client
        register = client.register_script
        self._begin = register(_BEGIN_TURN)
        self._claim = register(_CLAIM)
        self._finish = register(_FINISH_TURN)
        self._extend = register(_EXTEND_LOCK)
        self._describe = register(_DESCRIBE_CURRENT)
        self._list = register(_LIST)
        self._create = register(_CREATE)
        self._switch = register(_SWITCH)
        self._clear = register(_CLEAR)
        self._update = register(_UPDATE_SETTINGS)
        self._forget = register(_FORGET)

    @classmethod
    def from_url(cls, url: str, policy: StorePolicy) -> RedisStore:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
        )
        return cls(aioredis.Redis.from_pool(pool), policy, owns_client=True)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    @staticmethod
    def _keys(scope: str) -> list[str]:
        return [scope_key(scope, "state"), scope_key(scope, "names")]

    @staticmethod
    def _prefix(scope: str) -> str:
        return scope_key(scope, "")

    async def begin_turn(self, scope: str, ticket: Ticket, budget_bytes: int, lock_ms: int) -> Turn:
        args: list[ScriptArg] = [self._prefix(scope), ticket.token, lock_ms, budget_bytes]
        args += [self._policy.default_model, time.time(), ticket.place, ticket.claim or ""]
        args += [CLAIM_TTL_SECONDS, TICKET_TTL_MS]
        async with _available():
            reply = await self._begin(keys=self._keys(scope), args=args)
        status = reply[0]
        if status == "claimed":
            raise AlreadyClaimed()
        if status == "corrupt":
            raise CorruptSession(reply[1])
        if status == "busy":
            raise SessionBusy()
        name = reply[1]
        used, recent_json = reply[1 + _SUMMARY_FIELDS :]
        try:
            session = session_info(reply[1 : 1 + _SUMMARY_FIELDS])
            recent = decode_message_array(name, recent_json)
        except CorruptSession:
            placeholder = SessionInfo(name, SessionSettings(self._policy.default_model), 0, 0, 0)
            await self.finish_turn(Turn(scope, placeholder, [], 0, ticket.token), [])
            raise
        return Turn(scope, session, recent, int(used), ticket.token)

    async def claim(self, scope: str, claim: str) -> bool:
        async with _available():
            claimed = await self._claim(
                keys=self._keys(scope), args=[self._prefix(scope), claim, CLAIM_TTL_SECONDS]
            )
        return bool(claimed)

    async def finish_turn(
        self, turn: Turn, added: Sequence[Message], user_ref: str | None = None
    ) -> bool:
        policy = self._policy
        args: list[ScriptArg] = [
            self._prefix(turn.scope),
            turn.session.name,
            turn.lock_token,
            policy.history_cap,
            time.time(),
            policy.ttl_seconds,
            user_ref or "",
            *(encode_message(m) for m in added),
        ]
        async with _available():
            saved = await self._finish(keys=self._keys(turn.scope), args=args)
        return bool(saved)

    async def extend_lock(self, turn: Turn, lock_ms: int) -> bool:
        args: list[ScriptArg] = [
            self._prefix(turn.scope),
            turn.session.name,
            turn.lock_token,
            lock_ms,
        ]
        async with _available():
            return bool(await self._extend(keys=self._keys(turn.scope), args=args))

    async def current_session(self, scope: str) -> SessionInfo:
        async with _available():
            row = await self._describe(keys=self._keys(scope), args=[self._prefix(scope)])
        if row[1] == "":  # an untouched scope: report the session it would create
            return SessionInfo(row[0], SessionSettings(self._policy.default_model), 0, 0.0, 0.0)
        return session_info(row)

    async def list_sessions(self, scope: str) -> list[SessionInfo]:
        async with _available():
            rows = await self._list(keys=self._keys(scope), args=[self._prefix(scope)])
        return [
            session_info(rows[i : i + _SUMMARY_FIELDS])
            for i in range(0, len(rows), _SUMMARY_FIELDS)
        ]

    async def create_session(self, scope: str, name: str, settings: SessionSettings) -> SessionInfo:
        args: list[ScriptArg] = [
            self._prefix(scope),
            name,
            settings.model,
            mcp_json(settings),
            time.time(),
        ]
        async with _available():
            row = await self._create(keys=self._keys(scope), args=args)
        if not row:
            raise InvalidInput(f"A session named {name!r} exists already; use /load {name}.")
        return session_info(row)

    async def switch_session(self, scope: str, name: str) -> SessionInfo:
        async with _available():
            row = await self._switch(
                keys=self._keys(scope), args=[self._prefix(scope), name, time.time()]
            )
        if not row:
            raise UnknownSession(f"There is no session named {name!r}; /list shows them.")
        return session_info(row)

    async def clear_session(self, scope: str) -> SessionInfo:
        args: list[ScriptArg] = [self._prefix(scope), self._policy.default_model, time.time()]
        async with _available():
            return session_info(await self._clear(keys=self._keys(scope), args=args))

    async def update_settings(self, scope: str, settings: SessionSettings) -> SessionInfo:
        args: list[ScriptArg] = [
            self._prefix(scope),
            self._policy.default_model,
            time.time(),
            settings.model,
            mcp_json(settings),
        ]
        async with _available():
            return session_info(await self._update(keys=self._keys(scope), args=args))

    async def forget_message(self, scope: str, user_ref: str) -> bool:
        async with _available():
            removed = await self._forget(
                keys=self._keys(scope), args=[self._prefix(scope), user_ref]
            )
        return bool(removed)

    async def scope_option(self, scope: str, option: str) -> str | None:
        async with _available():
            value = await self._redis.hget(scope_key(scope, "state"), f"opt:{option}")
        return None if value is None else str(value)

    async def set_scope_option(self, scope: str, option: str, value: str) -> None:
        async with _available():
            await self._redis.hset(scope_key(scope, "state"), f"opt:{option}", value)

    async def read_history(self, scope: str, name: str) -> list[Message]:
        async with _available():
            raw = await self._redis.lrange(session_key(scope, name, "messages"), 0, -1)
        return decode_messages(name, [str(item) for item in raw])

    async def import_sessions(
        self, scope: str, sessions: dict[str, list[Message]], settings: SessionSettings
    ) -> None:
        now = time.time()
        async with _available(), self._redis.pipeline(transaction=True) as tx:
            for name, messages in sessions.items():
                meta = session_key(scope, name, "meta")
                stored = session_key(scope, name, "messages")
                tx.delete(meta, stored, session_key(scope, name, "refs"))
                tx.hset(
                    meta,
                    mapping={
                        "model": settings.model,
                        "mcp": mcp_json(settings),
                        "created": now,
                        "updated": now,
                        "format": STORE_FORMAT,
                    },
                )
                if messages:
                    tx.rpush(stored, *(encode_message(m) for m in messages))
                    tx.ltrim(stored, -self._policy.history_cap, -1)
                tx.zadd(scope_key(scope, "names"), {name: now})
            if sessions:
                tx.hsetnx(scope_key(scope, "state"), "current", next(iter(sessions)))
            await tx.execute()


@asynccontextmanager
async def _available() -> AsyncIterator[None]:
    """Turn a lost connection into the one error users are shown for it."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        raise StoreUnavailable() from error
