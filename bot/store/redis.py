"""The production store: sessions in Redis, each operation one Lua script (one round trip).

Layout (every key of a scope shares the hash tag `{scope}`, so all of them hash to one slot
and a script touches a single slot, as Redis Cluster requires; the scripts also build
session keys not passed to them in KEYS, which `_PRELUDE`'s probe makes safe while a slot
moves between nodes):

    {prefix}:{scope}:state              hash    current -> session name; opt:{option} -> value
                                                (`/mode`, `/persona`, the last message answered)
    {prefix}:{scope}:names              zset    session name -> last use (unix seconds)
    {prefix}:{scope}:refindex           hash    user ref -> name of the session storing it
    {prefix}:{scope}:queue              zset    waiting turns' places, in text order (score 0)
    {prefix}:{scope}:tickets            hash    place -> deadline (ms); a lapsed place is dropped
    {prefix}:{scope}:forgot:{ref}       string  a deleted message not stored (yet), for an hour
    {prefix}:{scope}:claim:{id}         string  a claimed message id: a lease (`lease:` and the
                                                turn's token) expiring with the turn's lock, then
                                                `answered` for a day
    {prefix}:places                     zset    scope -> when the bot last answered there
    {{prefix}:places}:servers           hash    scope -> its server (`NotedPlace.server`), for the
                                                places in `places` noted since it was kept
    {prefix}:{scope}:probe:absent       never written: a cluster's scripts read it first (`PROBE`)
    {prefix}:{scope}:usage              hash    a session's tokens; the servers' counters are
                                                in `bot.store.redis_usage`
    {prefix}:{scope}:s:{name}:meta      hash    model, mcp (JSON list), created, updated, format,
                                                last_turn (the last saved turn's token),
                                                gen and seq (see below), forgotten (messages
                                                removed by forget_message since the last clear),
                                                bytes (stored size of the messages),
                                                epoch (replaced by a clear or an import only),
                                                summary, summary_upto, summary_covered (the
                                                model's summary of the messages up to seq
                                                summary_upto; see `Summary`)
    {prefix}:{scope}:s:{name}:messages  list    one JSON message per element, oldest first
    {prefix}:{scope}:s:{name}:refs      hash    user ref (Discord message id) -> stored JSON
    {prefix}:{scope}:s:{name}:refseq    zset    user ref -> seq of its message (drops the refs
                                                of messages the history cap trimmed)
    {prefix}:{scope}:s:{name}:answers   hash    user ref -> the messages that carried its
                                                answer (`note_answer`); goes with its ref
    {prefix}:{scope}:s:{name}:lock      string  token of the turn in progress, with expiry
    {prefix}:{scope}:s:{name}:summarizing  string  token of the process writing its summary,
                                                with expiry (the summarizing lease)

A session name appears in keys and values in its stored form (`stored_name`: `my%20project`
for "my project"); the scripts see only that form, and Python turns it back at the edge.

With a TTL, every script that uses a session (a turn, /new, /load, /clear, a settings
change, an import) sets it on that session's keys and the scope's `state`, `names` and
`refindex`, so a place's keys go TTL after its last use; a session not used that long goes
alone, its name leaving `names` at the place's next use and its entries `refindex` over the
following uses (`sweep` in the state hash is where that scan stands). The queue and tickets expire
once no turn has waited for `TICKET_TTL_MS` (every place in them has lapsed by then); claims
after a day or the TTL, whichever is shorter; locks after their lease.

A session's `gen` (generation) is replaced whenever its history changes other than by
appending, and every append raises its `seq` by the number of messages appended: together
they tell a process whether its cached recent messages are still the newest but a few
(`bot.store.recent`). `generations` in the state hash keeps new generations unique.

The scripts build session keys from the scope prefix and the name, because the current
session's name is only known inside the script; `session_key` is the Python twin of `key()`
in `_PRELUDE` and the two must agree.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.exceptions import (
    AuthenticationError,
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    import hiredis

from bot.errors import (
    CorruptSession,
    DamagedState,
    InvalidInput,
    SessionBusy,
    SessionLimit,
    StoreUnavailable,
    SummaryInProgress,
    UnknownSession,
)
from bot.store.base import (
    CLAIM_ANSWERED,
    DEFAULT_SESSION,
    DELETED_TTL_SECONDS,
    FORGOTTEN_TTL_SECONDS,
    LAST_ANSWERED_OPTION,
    PERSONA_OPTION,
    PLACES_KEPT,
    PLACES_KEPT_SECONDS,
    STORE_FORMAT,
    STORED_NAME_MAX_BYTES,
    TICKET_TTL_MS,
    AlreadyClaimed,
    Exchange,
    Message,
    NotedPlace,
    PlaceNotes,
    SessionCleared,
    SessionInfo,
    SessionSettings,
    StorePolicy,
    StoreStats,
    Summary,
    SummarySource,
    Ticket,
    Turn,
    answer_record,
    answered_id,
    as_reloaded,
    decode_message_array,
    decode_messages,
    exchange_from,
    listed_sessions,
    mcp_json,
    session_info,
    shown_name,
    stored_bytes,
    stored_name,
)
from bot.store.recent import RecentCache, RecentWindow
from bot.store.redis_functions import FunctionLibrary
from bot.store.redis_pipelining import AutoPipeline, raised
from bot.store.redis_usage import RedisUsage
from bot.usage import NOTHING_USED, Admission, Charge, Refusal, ServerUsage, SessionUsage

log = logging.getLogger(__name__)

KEY_PREFIX = "dcbot"

ScriptArg = str | int | float
T = TypeVar("T")
MAX_CONNECTIONS = 64
"""Beyond this many calls in flight, a call waits for a free connection (redis-py's default
pool raises at once, which a busy bot would report as an outage)."""
FIRST_READ_MESSAGES = 256
"""How many of a session's newest messages a first turn in this process reads beside its
`begin_turn` (see there): more than the context budget takes of usual messages."""
CALL_TIMEOUT_SECONDS = 5.0
"""A store call not done by then (waiting for a connection included) fails as storage
unavailable: Redis stopped answering. One deadline per call, not redis-py's per-read
`socket_timeout`, which wraps every command in a task and costs a tenth of a turn."""
_SCRIPT_REFUSED_BY_CLUSTER = (
    "Script attempted to access a non local key",
    "Script attempted to execute a command while the cluster is down",
    "Script attempted to execute a write command while the cluster is down",
)
"""How a Redis Cluster node refuses a script's command (Redis 7's wording): the slot is
being moved away, or the cluster lost a slot's primary."""
CLUSTER_PROBE_SECONDS = 1.0
"""How long a Redis Cluster node has to answer a PING before `_reload_cluster_map` counts it
silent (a loopback or LAN node answers in well under a millisecond)."""
IMPORT_TIMEOUT_SECONDS = 120.0
"""An import sends whole sessions in one transaction, possibly many megabytes."""


class _HiredisPackedConnection(aioredis.Connection):
    """redis-py's asyncio connection packs each command in Python, copying the command so far
    once per argument; a turn's two scripts take about twenty arguments each. Its blocking
    client packs with hiredis, in C, when hiredis is installed (`redis[hiredis]`, as here):
    this does the same for the asyncio client. Arguments hiredis does not take (a bytearray,
    or a type Redis has no form for) go through redis-py's own `HiredisRespSerializer`,
    which converts them or raises redis-py's `DataError`. A turn's commands pack in about a
    fifth of the time."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):  # a command name of several words: 'CONFIG GET'
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        return [_pack(args)]


class _WaitingPool(aioredis.ConnectionPool):
    """redis-py's pool that waits for a free connection (`BlockingConnectionPool`) takes an
    `asyncio.Condition` and a timeout scope, and records pool metrics nobody reads, around
    every command: about 70 µs of a 200 µs call on a small VM, and a third of a busy
    process's turns per second. This pool keeps its promise (at most `max_connections`, and
    a call past them waits, within the call's own deadline) with a plain check while a
    connection is free, and waits only when none is."""

    def __init__(self, **connection_kwargs: object) -> None:
        super().__init__(**connection_kwargs)  # type: ignore[arg-type]  # redis-py's kwargs
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _full(self) -> bool:
        return (
            not self._available_connections
            and len(self._in_use_connections) >= self.max_connections
        )

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def get_connection(
        self, command_name: str | None = None, *keys: object, **options: object
    ) -> AbstractConnection:
        while self._full():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # woken, then cancelled:
                    self._wake_one()  # the free connection goes to the next in line
                raise
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await self._ready(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    @staticmethod
    async def _ready(connection: AbstractConnection) -> None:
        """Connected, with nothing unread: a connection that was closed (Redis restarted) or
        holds bytes nobody asked for is opened again. redis-py's own check is skipped while
        its maintenance notifications are on, as they are by default ('auto')."""
        await connection.connect()  # type: ignore[no-untyped-call]
        try:
            stale = await connection.can_read()
        except (RedisConnectionError, OSError):
            stale = True
        if stale:
            await connection.disconnect()
            await connection.connect()  # type: ignore[no-untyped-call]

    async def release(self, connection: AbstractConnection) -> None:
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():  # type: ignore[no-untyped-call]
            await connection.disconnect()
        self._available_connections.append(connection)
        self._wake_one()


def _pack(args: tuple[EncodableT, ...]) -> bytes:
    """A command whose name is one word, packed by hiredis, or by redis-py's serializer for
    what hiredis does not take (see `_HiredisPackedConnection`)."""
    try:
        packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # any length
    except TypeError:
        return b"".join(_HiredisPackedConnection._packer.pack(*args))  # type: ignore[arg-type]
    return packed


def _auto_pipeline(
    url: str, pool: aioredis.ConnectionPool, call_timeout: float = CALL_TIMEOUT_SECONDS
) -> AutoPipeline | None:
    """For a plain redis:// URL (no TLS, no socket path, no options): the scripts' shared
    connection (`AutoPipeline`). Anything else keeps redis-py's own connections only."""
    parts = urllib.parse.urlsplit(url)
    if not HIREDIS_AVAILABLE or parts.scheme != "redis" or parts.query:
        return None
    settings = pool.connection_kwargs
    return AutoPipeline(
        _pack,
        host=settings.get("host", "localhost"),
        port=int(settings.get("port", 6379)),
        db=int(settings.get("db", 0)),
        username=settings.get("username"),
        password=settings.get("password"),
        connect_timeout=float(settings.get("socket_connect_timeout") or 2.0),
        call_timeout=call_timeout,
    )


class _Script:
    """A registered script, run over the shared connection where there is one (a single
    Redis, `_auto_pipeline`), as a function of the store's library while Redis takes them
    (`FunctionLibrary`), else with EVALSHA; without the shared connection, through
    redis-py's client."""

    def __init__(
        self,
        script: AsyncScript,
        pipeline: AutoPipeline | None,
        client: aioredis.Redis | RedisCluster,
        library: FunctionLibrary | None,
    ) -> None:
        self._script, self._pipeline, self._client = script, pipeline, client
        self._library = library if pipeline is not None else None
        source = script.script
        assert isinstance(source, str)  # as registered
        self._index = -1 if self._library is None else self._library.add(source)

    async def __call__(self, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        pipeline = self._pipeline
        if pipeline is None:
            return await self._script(keys=keys, args=args)
        return await self._loaded(lambda: pipeline.call(*self._command(keys, args)))

    async def then_read(
        self, keys: Sequence[str], args: Sequence[ScriptArg], read: tuple[EncodableT, ...]
    ) -> tuple[Any, Any]:
        """The script, then the command `read`, as one transaction on the shared connection
        (there must be one): both replies."""
        pipeline = self._pipeline
        assert pipeline is not None

        async def both() -> tuple[Any, Any]:
            script, after = await pipeline.transaction(self._command(keys, args), read)
            return raised(script), raised(after)  # NOSCRIPT: nothing ran but the read

        return await self._loaded(both)

    @property
    def source(self) -> str:
        return str(self._script.script)

    def wire_names(self) -> list[str]:
        """How a call of it shows on the wire and in Redis's logs: its SHA1 (EVALSHA) and,
        where it is in a library, its function's name (FCALL)."""
        names = [str(self._script.sha)]
        if self._library is not None:
            names.append(self._library.function(self._index))
        return names

    def _command(self, keys: Sequence[str], args: Sequence[ScriptArg]) -> tuple[EncodableT, ...]:
        library = self._library
        if library is not None and library.usable is not False:
            return library.command(self._index, keys, args)
        return ("EVALSHA", self._script.sha, len(keys), *keys, *args)

    async def _loaded(self, run: Callable[[], Awaitable[T]]) -> T:
        """`run`, again after loading what Redis did not have (a new server, or one that lost
        its scripts or functions), or after falling back to EVALSHA where Redis refuses
        functions."""
        pipeline, library = self._pipeline, self._library
        assert pipeline is not None
        for attempt in range(3):
            try:
                return await run()
            except NoScriptError:
                if attempt == 2:
                    raise
                await pipeline.call("SCRIPT", "LOAD", self._script.script)
            except ResponseError as error:
                if library is None or attempt == 2 or not library.answers(error):
                    raise
                await library.mend(pipeline.call, error)
        raise AssertionError("unreachable")


def redis_address(url: str) -> str:
    """Where `url` points, for a log line or an error: host and port (or the socket's path),
    never the password or the rest of the URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    return f"[{host}]:{parts.port or 6379}" if ":" in host else f"{host}:{parts.port or 6379}"


def failure_reason(error: BaseException | None) -> str:
    """Why Redis could not be used, in a few words and without the URL (which may hold a
    password); redis-py's messages say "Error 111 connecting to host:port. ..."."""
    if isinstance(error, TimeoutError | RedisTimeoutError):
        return "no answer in time"
    text = str(error)
    found = re.match(r"Error (-?\d+) connecting to \S+\. ?(.*?)\.?$", text)
    if found and int(found[1]) > 0:
        return os.strerror(int(found[1])).lower()
    if found:
        return found[2].lower() or "cannot connect"
    if isinstance(error, AuthenticationError):
        return f"authentication failed: {text.rstrip('.')}"
    return text.rstrip(".")[:120] or type(error).__name__


def scope_key(scope: str, part: str) -> str:
    """A scope-level key (`state` or `names`)."""
    if "{" in scope or "}" in scope:
        raise ValueError(f"scope ids cannot contain braces: {scope!r}")
    return f"{KEY_PREFIX}:{{{scope}}}:{part}"


def usage_key(server: str, part: str) -> str:
    """A key of a server's usage counters (`bot.store.redis_usage`): all in one slot."""
    if "{" in server or "}" in server:
        raise ValueError(f"server ids cannot contain braces: {server!r}")
    return f"{KEY_PREFIX}:{{usage:{server}}}:{part}"


def places_key() -> str:
    """The record of places answered recently: one key, so it is allowed on Redis Cluster."""
    return f"{KEY_PREFIX}:places"


def place_servers_key() -> str:
    """Each noted place's server. Its hash tag is the whole places key, so it shares that
    key's slot and both change in one script on Redis Cluster."""
    return f"{{{places_key()}}}:servers"


def session_key(scope: str, name: str, part: str) -> str:
    """A session-level key (`meta`, `messages`, `refs`, `refseq` or `lock`); `name` is the
    stored form (`stored_name`)."""
    return scope_key(scope, f"s:{name}:{part}")


# In the prelude, and in `_NOTE_PLACE`, which runs without it.
_DAMAGED_FUNCTION = """
-- Whether a `redis.pcall` reply says its key holds the wrong type. Reads of keys that may hold
-- junk go through pcall so that only the damaged case pays for the check, where a TYPE before
-- each read costs every call a call. Any other error is raised, as redis.call would.
local function damaged(reply)
  if type(reply) ~= 'table' or not reply.err then return false end
  if string.sub(reply.err, 1, 9) == 'WRONGTYPE' then return true end
  error(reply)
end
"""

# Note `scope` (of `server`, '' when unknown) in the places zset and their servers hash as
# noted `now`; places noted before `oldest`, and past the newest `kept`, leave both. Only a
# place new to the record can make it outgrow `kept`, and only its oldest place can be too
# old, so noting a place known already takes two calls (three with its server), where
# checking both keys and both limits in full took six. Junk in either key is dropped.
_NOTE_PLACE_FUNCTION = """
local function note_place(places, servers, scope, server, now, oldest, kept)
  local added = redis.pcall('ZADD', places, now, scope)
  if damaged(added) then
    redis.call('DEL', places)
    added = redis.call('ZADD', places, now, scope)
  end
  if server ~= '' and damaged(redis.pcall('HSET', servers, scope, server)) then
    redis.call('DEL', servers)
    redis.call('HSET', servers, scope, server)
  end
  local gone = {}
  local first = redis.call('ZRANGE', places, 0, 0, 'WITHSCORES')
  if tonumber(first[2]) < oldest then
    gone = redis.call('ZRANGEBYSCORE', places, '-inf', '(' .. oldest)
  end
  if added == 1 and redis.call('ZCARD', places) - #gone > kept then
    for _, old in ipairs(redis.call('ZRANGE', places, #gone, -kept - 1)) do
      gone[#gone + 1] = old
    end
  end
  for _, old in ipairs(gone) do
    redis.call('ZREM', places, old)
    if damaged(redis.pcall('HDEL', servers, old)) then redis.call('DEL', servers) end
  end
end
"""

# Shared Lua: key building, lazy creation of the current session, and a session's summary.
# KEYS[1] is always the scope's state hash and KEYS[2] its names zset; ARGV[1] the key prefix
# of the scope (everything before "state").
#
# The first call reads a key that never exists (`probe_key`), for Redis Cluster: while a
# slot is being moved away, its node still runs a script whose declared keys it holds, but
# fails the script's first command on a key it does not hold (one already moved, or one the
# script would create), keeping the writes made before it. Touching an absent key before
# anything else makes such a script fail whole, with nothing written; the client then sees
# storage unavailable until the slot's keys are all moved (then it is redirected to their
# new node). On a single Redis, where no slot moves, the store leaves it out (`_PROBE_CALL`).
_PRELUDE = (
    """
local prefix = ARGV[1]
$PROBE_CALL
local function key(name, part) return prefix .. 's:' .. name .. ':' .. part end
local function of_type(k, wanted)  -- a missing key is of every type
  local found = redis.call('TYPE', k).ok
  return found == wanted or found == 'none'
end
local function new_generation()
  local clock = redis.call('TIME')
  return clock[1] .. '.' .. clock[2] .. '.' .. redis.call('HINCRBY', KEYS[1], 'generations', 1)
end
local function create(name, model, mcp, now)
  local gen = new_generation()
  redis.call('HSET', key(name, 'meta'), 'model', model, 'mcp', mcp, 'created', now,
             'updated', now, 'format', '$FORMAT', 'gen', gen, 'epoch', gen, 'seq', 0, 'bytes', 0)
  redis.call('ZADD', KEYS[2], now, name)
end
local function mark_new_scope()  -- nothing stored yet, so its ref index is complete
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('HSET', KEYS[1], 'refindex', 1)
  end
end
local function current_or_create(model, now)
  local name = redis.call('HGET', KEYS[1], 'current')
  if not name then
    name = '$DEFAULT'
    mark_new_scope()
    redis.call('HSET', KEYS[1], 'current', name)
  end
  if redis.call('EXISTS', key(name, 'meta')) == 0 then create(name, model, '[]', now) end
  return name
end
"""
    + _DAMAGED_FUNCTION.lstrip("\n")
    + """local function answered(claim, mine, ttl)
  local claimed = prefix .. 'claim:' .. claim
  local claimant = redis.pcall('GET', claimed)
  if damaged(claimant) or claimant ~= mine then return end
  redis.call('SET', claimed, '$ANSWERED', 'EX', ttl)
  local last = redis.pcall('HGET', KEYS[1], 'opt:$LAST')
  if damaged(last) then return end  -- /clear or /new repairs it
  if not last or #claim > #last or (#claim == #last and claim > last) then
    redis.call('HSET', KEYS[1], 'opt:$LAST', claim)
  end
end
local function prune(ttl)  -- names whose session expired (the EXISTS check forgives skew)
  if tonumber(ttl) == 0 then return end
  local cutoff = redis.call('TIME')[1] - tonumber(ttl)
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)) do
    if redis.call('EXISTS', key(name, 'meta')) == 0 then
      redis.call('ZREM', KEYS[2], name)
      redis.call('HSET', KEYS[1], 'sweep', 0)  -- its refs leave the index, see sweep()
    end
  end
end
local function sweep()  -- a few index entries per call, dropping those of expired sessions
  local cursor = redis.call('HGET', KEYS[1], 'sweep')
  if not cursor then return end
  local index = prefix .. 'refindex'
  if not tonumber(cursor) or redis.call('TYPE', index).ok ~= 'hash' then  -- damaged: give up
    redis.call('HDEL', KEYS[1], 'sweep')
    return
  end
  local found = redis.call('HSCAN', index, cursor, 'COUNT', 50)
  local entries = found[2]
  for i = 1, #entries, 2 do
    if not redis.call('ZSCORE', KEYS[2], entries[i + 1]) then
      redis.call('HDEL', index, entries[i])
    end
  end
  if found[1] == '0' then
    redis.call('HDEL', KEYS[1], 'sweep')
  else
    redis.call('HSET', KEYS[1], 'sweep', found[1])
  end
end
local function touch(name, now, ttl)
  redis.call('ZADD', KEYS[2], now, name)
  if tonumber(ttl) > 0 then
    for _, k in ipairs({KEYS[1], KEYS[2], prefix .. 'refindex', key(name, 'meta'),
                        key(name, 'messages'), key(name, 'refs'), key(name, 'refseq'),
                        key(name, 'answers')}) do
      redis.call('EXPIRE', k, ttl)
    end
    prune(ttl)
    sweep()
  end
end
local function unindex(refs)  -- forget where these refs were stored
  if #refs > 0 then redis.call('HDEL', prefix .. 'refindex', unpack(refs)) end
end
local function unrecord(name, refs)  -- drop these refs' answer records (junk there: all)
  local answers = key(name, 'answers')
  if not of_type(answers, 'hash') then redis.call('DEL', answers)
  elseif #refs > 0 then redis.call('HDEL', answers, unpack(refs)) end
end
local function describe(name)  -- a key of the wrong type reads as an unknown format
  for part, wanted in pairs({meta = 'hash', messages = 'list', refs = 'hash', refseq = 'zset',
                             lock = 'string'}) do
    if not of_type(key(name, part), wanted) then return {name, '?', '', '', '0', '0', 0} end
  end
  local m = redis.call('HMGET', key(name, 'meta'), 'format', 'model', 'mcp', 'created', 'updated')
  return {name, m[1] or '', m[2] or '', m[3] or '', m[4] or '0', m[5] or '0',
          redis.call('LLEN', key(name, 'messages'))}
end
local function readable_name(name)  -- what the scripts can build keys from
  return #name > 0 and #name <= $NAME_BYTES and not string.find(name, '[%s%c:{}]')
end
local function readable_mcp(raw)  -- a JSON list of strings, as the reader wants it
  if not raw or not string.find(raw, '^%s*%[') then return false end
  local ok, servers = pcall(cjson.decode, raw)
  if not ok or type(servers) ~= 'table' then return false end
  local count = 0
  for i, server in pairs(servers) do
    if type(i) ~= 'number' or type(server) ~= 'string' then return false end
    count = count + 1
  end
  return count == #servers
end
-- The scope's own keys and the type each must have. Built when asked, as most calls never
-- ask: a script's top level runs at every call, and building them there cost every call.
local function scope_parts()
  return {state = KEYS[1], names = KEYS[2], queue = prefix .. 'queue',
          tickets = prefix .. 'tickets', refindex = prefix .. 'refindex'},
         {state = 'hash', names = 'zset', queue = 'zset', tickets = 'hash', refindex = 'hash'}
end
-- What is damaged among the scope's own keys (nil when nothing is): checked before a script
-- reads or writes them, so junk there gives one clear answer instead of a script error.
local function scope_damage()
  local scope_keys, scope_types = scope_parts()
  for part, k in pairs(scope_keys) do
    if not of_type(k, scope_types[part]) then return 'its ' .. part .. ' key has the wrong type' end
  end
  local state = redis.call('HMGET', KEYS[1], 'current', 'generations')
  if state[1] and not readable_name(state[1]) then
    return 'its current session name is unreadable'
  end
  if state[2] and not string.find(state[2], '^%d+$') then return 'a counter is not a number' end
  return nil
end
-- The way out for /clear and /new: drop what is damaged there (nothing in it is readable).
-- An unreadable current name is the caller's to replace.
local function repair_scope()
  local scope_keys, scope_types = scope_parts()
  for part, k in pairs(scope_keys) do
    if not of_type(k, scope_types[part]) then
      redis.call('DEL', k)
      if part == 'refindex' then redis.call('HDEL', KEYS[1], 'refindex') end  -- rebuilt
    end
  end
  local generations = redis.call('HGET', KEYS[1], 'generations')
  if generations and not string.find(generations, '^%d+$') then
    redis.call('HDEL', KEYS[1], 'generations')
  end
end
-- A message's claim of the wrong type, or holding neither a lease nor `answered`, is junk: it
-- is dropped, so the message is answered.
local function claim_holder(claimed)
  if not of_type(claimed, 'string') then redis.call('DEL', claimed) return nil end
  local holder = redis.call('GET', claimed)
  if holder and holder ~= '$ANSWERED' and string.sub(holder, 1, 6) ~= 'lease:' then
    redis.call('DEL', claimed)
    return nil
  end
  return holder
end
"""
)


PROBE = "probe:absent"
"""The part of the key every script reads first and nothing writes (`_PRELUDE`)."""

DAMAGED = "!damaged"
"""The first element of a script's reply when the scope's own keys are damaged (no session
name can contain '!'); the second says what is."""


_PROBE_CALL = f"redis.call('EXISTS', prefix .. '{PROBE}')\n"
"""The prelude's probe (see `_PRELUDE`): a cluster's scripts only."""


def _lua(body: str) -> str:
    """A script: the prelude, then `body`, with the format, default session and claim values
    filled in (`claim_lease` is the Python twin of the scripts' `'lease:' .. token`)."""
    script = _PRELUDE + body
    for name, value in (
        ("$FORMAT", STORE_FORMAT),
        ("$DEFAULT", DEFAULT_SESSION),
        ("$ANSWERED", CLAIM_ANSWERED),
        ("$LAST", LAST_ANSWERED_OPTION),
        ("$PERSONA", PERSONA_OPTION),
        ("$DAMAGED", DAMAGED),
        ("$PROBE_CALL\n", _PROBE_CALL),
        ("$NAME_BYTES", str(STORED_NAME_MAX_BYTES)),
    ):
        script = script.replace(name, value)
    return script


def _single_redis(script: str) -> str:
    """`script` as a single Redis runs it: without the probe, which guards scripts on a
    cluster's slot being moved (`_PRELUDE`)."""
    return script.replace(_PROBE_CALL, "", 1)


# ARGV: prefix, token, lock_ms, budget_bytes, default_model, now, place, claim, claim_ttl,
# ticket_ttl_ms, cached name, cached gen, cached seq, cached count, history_cap, ttl_seconds,
# trim_bytes, the session whose newest messages the caller reads itself in the same
# transaction ('' for none: see `begin_turn`), and, when KEYS[3] is the places record
# (KEYS[4] their servers): scope, now, places kept seconds, places kept, the place's server
# ('' when unknown). Claim, then queue,
# then lock; only the first ticket of the queue may lock (and then the place is noted, on a
# single Redis only: the record is in a slot of its own). Then
# the newest messages that fit the budget: only those after the cached seq ('delta') when the
# caller's cache of this session is still a prefix of it (same gen, and below the caps the
# length grew by exactly the messages appended since, which also catches writes that bypassed
# these scripts; a session holding at most `trim_bytes`, the byte cap less one message, has
# not been trimmed for its size since it last held less), else the
# window ('window', or 'all' when it holds the whole history), or no message at all ('read')
# when the caller reads the window itself and named this session. The reply: 'ok', the session's
# summary row, its gen, seq, mode and epoch, the place's persona, the session's summary (text,
# upto, covered), the place's last answered message ('' for none: the channel context reads
# what was said since), then the messages. The messages come last, oldest
# first, as one nested array: Redis copies every byte a script handles (in from LRANGE, out
# into the reply) at several times the cost of a plain LRANGE, so the script touches each
# message as little as it can, and the client measures their sizes. A usual turn (see `usual`)
# makes 13 calls where one that looks at every key makes about 25: a script's time inside
# Redis is mostly its calls (1-3 µs each), not the work they do.
_BEGIN_TURN = _lua(
    _NOTE_PLACE_FUNCTION
    + """
local token, claim = ARGV[2], ARGV[8]
local mine = 'lease:' .. token
local function noted()  -- the place noted here (see `note_place`), once the lock is held
  if KEYS[3] then
    local at = tonumber(ARGV[20])
    note_place(KEYS[3], KEYS[4], ARGV[19], ARGV[23], at, at - tonumber(ARGV[21]),
               tonumber(ARGV[22]))
  end
end
-- The reply once the lock is held: `info` is the session's summary row (`describe`), `stamp`
-- its meta fields gen, seq, bytes, epoch, summary, summary_upto, summary_covered, and `own`
-- the place's persona and last answered message.
local function loaded(name, info, stamp, own)
  local meta, count = key(name, 'meta'), info[7]
  local out = {'ok'}
  for _, v in ipairs(info) do out[#out + 1] = v end
  local gen, seq = stamp[1], tonumber(stamp[2]) or 0
  if not gen then  -- stored before sessions had generations
    gen, seq = new_generation(), count
    redis.call('HSET', meta, 'gen', gen, 'seq', seq)
  end
  local wanted, mode = count, 'window'
  if ARGV[12] == gen and ARGV[11] == name then
    local since = seq - tonumber(ARGV[13])
    local grown = count - tonumber(ARGV[14]) == since or count >= tonumber(ARGV[15])
                  or (tonumber(stamp[3]) or 0) > tonumber(ARGV[17])
    if since >= 0 and since <= count and grown then wanted, mode = since, 'delta' end
  end
  local head = #out
  out[head + 1], out[head + 2], out[head + 3] = gen, seq, mode
  out[head + 4] = stamp[4] or ''
  out[head + 5], out[head + 9] = own[1] or '', own[2] or ''
  out[head + 6], out[head + 7], out[head + 8] = stamp[5] or '', stamp[6] or '', stamp[7] or ''
  if mode == 'window' and ARGV[18] == name then
    -- The caller reads this session's newest messages itself, in the same transaction.
    out[head + 3], out[head + 10] = 'read', {}
    return out
  end
  local messages, budget, first = key(name, 'messages'), tonumber(ARGV[4]), count - wanted
  local total = tonumber(stamp[3])
  if total and total <= budget then
    -- All of it fits (so does any part): one read, no size to look at.
    out[head + 10] = first < count and redis.call('LRANGE', messages, first, count - 1) or {}
    if mode == 'window' then out[head + 3] = 'all' end
    return out
  end
  local used, stop, full, newest = 0, count, false, {}
  while stop > first and not full do
    local start = math.max(stop - 64, first)
    local page = redis.call('LRANGE', messages, start, stop - 1)
    for j = #page, 1, -1 do
      local size = #page[j]
      if used + size > budget then full = true break end
      used = used + size
      newest[#newest + 1] = page[j]
    end
    stop = start
  end
  if full then mode = 'window' elseif mode == 'window' then mode = 'all' end
  local ordered, n = {}, #newest
  for i = 1, n do ordered[i] = newest[n + 1 - i] end
  out[head + 3], out[head + 10] = mode, ordered
  return out
end
-- The usual turn, in as few calls as it takes: the place's keys sound, its current session
-- readable, nobody waiting, the lock free. Junk shows as an error reply (`redis.pcall`) or a
-- value out of place, and sends the turn the thorough way below (nil), which checks every key
-- before it writes: everything written here before that is what the thorough way writes too
-- (the claim, the session's last use). The one thing never done here: giving up after taking
-- the lock.
local function usual()
  if claim ~= '' then
    local claimed = prefix .. 'claim:' .. claim
    local held = redis.pcall('SET', claimed, mine, 'NX', 'GET', 'PX', ARGV[3])
    if type(held) == 'table' then return nil end  -- not a string (or Redis before 7)
    if held and held ~= mine then
      if held == '$ANSWERED' then return {'claimed', 'answered'} end
      if string.sub(held, 1, 6) == 'lease:' then return {'claimed', 'lease'} end
      return nil  -- junk, dropped the thorough way
    end
    if held then redis.call('SET', claimed, mine, 'PX', ARGV[3]) end  -- this turn's, again
  end
  local own = redis.pcall('HMGET', KEYS[1], 'current', 'generations', 'opt:$PERSONA', 'opt:$LAST')
  if own.err then return nil end
  local name = own[1]
  if not name or not readable_name(name)
     or (own[2] and not string.find(own[2], '^%d+$')) then return nil end
  if redis.call('EXISTS', prefix .. 'queue') == 1 then return nil end
  if not of_type(prefix .. 'tickets', 'hash') or not of_type(prefix .. 'refindex', 'hash') then
    return nil
  end
  if type(redis.pcall('ZADD', KEYS[2], ARGV[6], name)) == 'table' then return nil end
  local m = redis.pcall('HMGET', key(name, 'meta'), 'format', 'model', 'mcp', 'created',
                        'updated', 'gen', 'seq', 'bytes', 'epoch', 'summary', 'summary_upto',
                        'summary_covered')
  if m.err or m[1] ~= '$FORMAT' or not m[6] or not tonumber(m[7]) then return nil end
  local count = redis.pcall('LLEN', key(name, 'messages'))
  if type(count) ~= 'number' or not of_type(key(name, 'refs'), 'hash')
     or not of_type(key(name, 'refseq'), 'zset') then
    return nil
  end
  if not redis.call('SET', key(name, 'lock'), token, 'NX', 'PX', ARGV[3]) then return nil end
  if tonumber(ARGV[16]) > 0 then touch(name, ARGV[6], ARGV[16]) end  -- the rest of it
  noted()
  local info = {name, m[1], m[2], m[3], m[4] or '0', m[5] or '0', count}
  return loaded(name, info, {m[6], m[7], m[8], m[9], m[10], m[11], m[12]}, {own[3], own[4]})
end
local fast = usual()
if fast then return fast end
-- The thorough way: every key checked before it is used.
if claim ~= '' then
  local claimed = prefix .. 'claim:' .. claim
  local holder = claim_holder(claimed)
  if holder and holder ~= mine then
    return {'claimed', string.sub(holder, 1, 6) == 'lease:' and 'lease' or 'answered'}
  end
  redis.call('SET', claimed, mine, 'PX', ARGV[3])
end
local damage = scope_damage()
if damage then
  if claim ~= '' then answered(claim, mine, ARGV[9]) end  -- told once, by this process
  return {'damaged', damage}
end
local queue, tickets, place = prefix .. 'queue', prefix .. 'tickets', ARGV[7]
local function join_queue()  -- returns the time (ms)
  local clock = redis.call('TIME')
  local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
  redis.call('ZADD', queue, 0, place)
  redis.call('HSET', tickets, place, now_ms + tonumber(ARGV[10]))
  redis.call('PEXPIRE', queue, ARGV[10])  -- once nobody waited that long, every place lapsed
  redis.call('PEXPIRE', tickets, ARGV[10])
  return now_ms
end
-- With nobody waiting (the usual case), a turn joins the queue only if the lock is taken.
local queued = redis.call('EXISTS', queue) == 1
if queued then
  local now_ms = join_queue()
  local first = redis.call('ZRANGE', queue, 0, 0)[1]
  while first ~= place and (tonumber(redis.call('HGET', tickets, first)) or 0) < now_ms do
    redis.call('ZREM', queue, first)
    redis.call('HDEL', tickets, first)
    first = redis.call('ZRANGE', queue, 0, 0)[1]
  end
  if first ~= place then return {'busy'} end
end
local function leave_queue()
  if not queued then return end
  redis.call('ZREM', queue, place)
  redis.call('HDEL', tickets, place)
end
local name = current_or_create(ARGV[5], ARGV[6])
touch(name, ARGV[6], ARGV[16])
local info = describe(name)
local stamp = {}
if info[2] == '$FORMAT' then
  stamp = redis.call('HMGET', key(name, 'meta'), 'gen', 'seq', 'bytes', 'epoch', 'summary',
                     'summary_upto', 'summary_covered')
end
if info[2] ~= '$FORMAT' or (stamp[2] and not tonumber(stamp[2])) then
  leave_queue()
  if claim ~= '' then answered(claim, mine, ARGV[9]) end
  return {'corrupt', name}
end
if not redis.call('SET', key(name, 'lock'), token, 'NX', 'PX', ARGV[3]) then
  if not queued then join_queue() end  -- its place kept for its next try
  return {'busy'}
end
leave_queue()
noted()
-- The place's persona and last answer are read at every turn, in this step.
return loaded(name, info, stamp, redis.call('HMGET', KEYS[1], 'opt:$PERSONA', 'opt:$LAST'))
"""
)

# ARGV: prefix, claim, token, lease_ms. 'ok', or who has it: 'lease' or 'answered'.
_CLAIM = _lua(
    """
local claimed, mine = prefix .. 'claim:' .. ARGV[2], 'lease:' .. ARGV[3]
local holder = claim_holder(claimed)
if holder and holder ~= mine then
  return string.sub(holder, 1, 6) == 'lease:' and 'lease' or 'answered'
end
redis.call('SET', claimed, mine, 'PX', ARGV[4])
return 'ok'
"""
)

# ARGV: prefix, claim, token, answered (1 or 0), claim_ttl, ttl_seconds. A state this made
# (for `last_answered`, in a place with no turn yet) expires with the TTL like any other.
_SETTLE_CLAIM = _lua(
    """
local mine = 'lease:' .. ARGV[3]
if ARGV[4] == '1' then
  answered(ARGV[2], mine, ARGV[5])
  if tonumber(ARGV[6]) > 0 and redis.call('TTL', KEYS[1]) == -1 then
    redis.call('EXPIRE', KEYS[1], ARGV[6])
  end
elseif of_type(prefix .. 'claim:' .. ARGV[2], 'string')
       and redis.call('GET', prefix .. 'claim:' .. ARGV[2]) == mine then
  redis.call('DEL', prefix .. 'claim:' .. ARGV[2])
end
return 1
"""
)

# ARGV: prefix, name, token, history_cap, now, ttl_seconds, user_ref, claim, claim_ttl,
# history_cap_bytes, epoch, seq, model, mcp_json, the usage field prefix (the session's shown
# name; '' for no charge), tokens in, tokens out, tokens estimated, message...
# The run's tokens are added to the session's totals first, whatever the outcome, once per
# turn: the totals remember the last turn charged (`<name>:charged`, its token), which is all a
# save repeated at once because its reply was lost needs. Idempotent: the meta remembers
# the last saved turn's token, so a call repeated because its reply was lost (a timeout) saves
# nothing twice. Returns {1, gen, seq, length} after appending, {1} when nothing was appended
# (or already had been), {0} when the lock was lost, {2} when the session was cleared or
# replaced during the turn (its `epoch` changed; the lock is released), {3} when its counter
# is damaged (nothing written). A turn whose lock lapsed unclaimed saves only if the session
# is still current and exactly as it began (same epoch and seq): otherwise it would save stale
# work. The claim, while this turn's lease, is settled as answered in every case. Beyond
# either cap the oldest messages go, with their refs, the newest staying.
_FINISH_TURN = _lua(
    """
-- Reads of keys that may hold junk go through pcall (see `damaged`).
local name, token = ARGV[2], ARGV[3]
if ARGV[15] ~= '' then
  local usage, field = prefix .. 'usage', ARGV[15]
  local charged = redis.pcall('HGET', usage, field .. ':charged')
  if damaged(charged) then redis.call('DEL', usage) end  -- junk: counts start again
  if charged ~= token then
    redis.call('HSET', usage, field .. ':charged', token)
    redis.call('HINCRBY', usage, field .. ':in', ARGV[16])
    redis.call('HINCRBY', usage, field .. ':out', ARGV[17])
    redis.call('HINCRBY', usage, field .. ':est', ARGV[18])
  end
  if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', usage, ARGV[6]) end
end
if ARGV[8] ~= '' then answered(ARGV[8], 'lease:' .. token, ARGV[9]) end
local lock, meta = key(name, 'lock'), key(name, 'meta')
local holder = redis.pcall('GET', lock)
if damaged(holder) then return {3} end  -- nothing written to the session yet
local stamp = redis.pcall('HMGET', meta, 'last_turn', 'gen', 'forgotten', 'bytes', 'epoch', 'seq')
if damaged(stamp) then return {3} end
local last_turn, gen, forgotten, total, epoch, seq_now = unpack(stamp, 1, 6)
local seq_stored = seq_now  -- what the meta holds, which the save counts on from
if last_turn == token then return {1} end
if holder and holder ~= token then return {0} end
local cap, byte_cap = tonumber(ARGV[4]), tonumber(ARGV[10])
local out = {1}
local first = 19  -- the first message among ARGV
local saving = #ARGV >= first
if ARGV[11] ~= '' and (epoch or '') ~= ARGV[11]
   and redis.call('EXISTS', prefix .. 'deleted:' .. ARGV[11]) == 1 then
  -- The session this turn began in was deleted meanwhile: nothing of it may come back.
  if holder then redis.call('DEL', lock) end
  if saving then return {2} end
  return {1}
end
local deleted = prefix .. 'forgot:' .. ARGV[7]
if saving and ARGV[7] ~= '' and redis.call('EXISTS', deleted) == 1 then
  -- Its author deleted the message while it was being answered: keep neither.
  redis.call('DEL', deleted)
  if holder then redis.call('DEL', lock) end
  return {1}
end
-- A meta holding none of the fields read may still be there (an old one): then ask.
if saving and not (last_turn or gen or forgotten or total or epoch or seq_now)
   and redis.call('EXISTS', meta) == 0 then
  -- The session is gone entirely (storage lost its data, or it expired): no history is
  -- there for this turn to be stale against, so the turn starts the session again.
  create(name, ARGV[13], ARGV[14], ARGV[5])
  gen, epoch, seq_now = redis.call('HGET', meta, 'gen'), ARGV[11], ARGV[12]
  seq_stored = 0
  holder = holder or token
end
if saving and seq_now and not tonumber(seq_now) then  -- damaged: check before writing
  if holder then redis.call('DEL', lock) end
  return {3}
end
if saving and (epoch or '') ~= ARGV[11] then
  if holder then redis.call('DEL', lock) return {2} end
  return {0}
end
if saving and not holder then
  if redis.call('HGET', KEYS[1], 'current') ~= name or seq_now ~= ARGV[12] then return {0} end
end
if saving then
  local messages = key(name, 'messages')
  total = tonumber(total)
  if not total then  -- stored before sessions counted their bytes
    total = 0
    for _, m in ipairs(redis.call('LRANGE', messages, 0, -1)) do total = total + #m end
  end
  local length = redis.call('RPUSH', messages, unpack(ARGV, first))
  for i = first, #ARGV do total = total + #ARGV[i] end
  local seq = (tonumber(seq_stored) or 0) + #ARGV - first + 1  -- written with the meta below
  local refs, order = key(name, 'refs'), key(name, 'refseq')
  if ARGV[7] ~= '' then
    redis.call('HSET', refs, ARGV[7], ARGV[first])
    redis.call('ZADD', order, seq - (#ARGV - first), ARGV[7])
    redis.call('HSET', prefix .. 'refindex', ARGV[7], name)
  end
  -- The oldest messages beyond the caps, read to count their bytes and drop their refs.
  local dropped = {}
  if length > cap then dropped = redis.call('LRANGE', messages, 0, length - cap - 1) end
  for _, m in ipairs(dropped) do total = total - #m end
  local page = 4
  while total > byte_cap and #dropped < length - 1 do
    local more = redis.call('LRANGE', messages, #dropped, #dropped + page - 1)
    for _, m in ipairs(more) do
      if total <= byte_cap or #dropped >= length - 1 then break end
      dropped[#dropped + 1] = m
      total = total - #m
    end
    page = page * 2
  end
  if #dropped > 0 then
    redis.call('LTRIM', messages, #dropped, -1)
    -- Refs go in message order: each dropped message that is the oldest ref's takes it along.
    -- Also drop the refs of messages surely gone by count (`cap` messages came after them, not
    -- counting the `forgotten` that may have been among them), whatever their text.
    local gone = {}
    local trimmed = seq - cap - (tonumber(forgotten) or 0)
    for _, ref in ipairs(redis.call('ZRANGEBYSCORE', order, '-inf', trimmed)) do
      gone[#gone + 1] = ref
    end
    local oldest = redis.call('ZRANGE', order, #gone, #gone)[1]
    local text = oldest and redis.call('HGET', refs, oldest)
    for _, m in ipairs(dropped) do
      if text and m == text then
        gone[#gone + 1] = oldest
        oldest = redis.call('ZRANGE', order, #gone, #gone)[1]
        text = oldest and redis.call('HGET', refs, oldest)
      end
    end
    if #gone > 0 then
      redis.call('HDEL', refs, unpack(gone))
      redis.call('ZREM', order, unpack(gone))
      unindex(gone)
      unrecord(name, gone)
    end
  end
  redis.call('HSET', meta, 'updated', ARGV[5], 'last_turn', token, 'bytes', total, 'seq', seq)
  out = {1, gen or '', seq, length - #dropped}
end
if holder then redis.call('DEL', lock) end
-- The session's last use was noted when its turn began; with a TTL, the keys this save
-- created (its first messages, refs) are given it here.
if tonumber(ARGV[6]) > 0 then touch(name, ARGV[5], ARGV[6]) end
return out
"""
)

# ARGV: prefix, name, token, lock_ms, claim
_EXTEND_LOCK = _lua(
    """
local lock = key(ARGV[2], 'lock')
if not of_type(lock, 'string') or redis.call('GET', lock) ~= ARGV[3] then return 0 end
local claimed = prefix .. 'claim:' .. ARGV[5]
if ARGV[5] ~= '' and of_type(claimed, 'string')
   and redis.call('GET', claimed) == 'lease:' .. ARGV[3] then
  redis.call('PEXPIRE', claimed, ARGV[4])
end
return redis.call('PEXPIRE', lock, ARGV[4])
"""
)

# ARGV: prefix
_DESCRIBE_CURRENT = _lua(
    """
local damage = scope_damage()
if damage then return {'$DAMAGED', damage} end
local name = redis.call('HGET', KEYS[1], 'current') or '$DEFAULT'
return describe(name)
"""
)

# ARGV: prefix, limit, ttl_seconds. The `limit` most recently used; forgets names whose
# session expired.
_LIST = _lua(
    """
local damage = scope_damage()
if damage then return {'$DAMAGED', damage} end
prune(ARGV[3])
local out = {}
for _, name in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)) do
  if redis.call('EXISTS', key(name, 'meta')) == 1 then
    for _, v in ipairs(describe(name)) do out[#out + 1] = v end
  else
    redis.call('ZREM', KEYS[2], name)
  end
end
return out
"""
)

# ARGV: prefix, name, model, mcp_json, now, ttl_seconds, limit. {} when the name is taken,
# {'full'} when the scope has `limit` sessions already.
_CREATE = _lua(
    """
repair_scope()
if redis.call('EXISTS', key(ARGV[2], 'meta')) == 1 then return {} end
prune(ARGV[6])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then return {'full'} end
mark_new_scope()
create(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], 'current', ARGV[2])
touch(ARGV[2], ARGV[5], ARGV[6])
return describe(ARGV[2])
"""
)

# ARGV: prefix, name, now, ttl_seconds
_SWITCH = _lua(
    """
local damage = scope_damage()
if damage then return {'$DAMAGED', damage} end
if redis.call('EXISTS', key(ARGV[2], 'meta')) == 0 then return {} end
redis.call('HSET', KEYS[1], 'current', ARGV[2])
touch(ARGV[2], ARGV[3], ARGV[4])
return describe(ARGV[2])
"""
)

# ARGV: prefix, default_model, now, ttl_seconds. Also the way out of an unreadable session: it
# rewrites the format marker and keeps the settings when they are readable.
_CLEAR = _lua(
    """
repair_scope()
local current = redis.call('HGET', KEYS[1], 'current')
if current and not readable_name(current) then  -- start afresh, under a name not taken
  local fresh, n = '$DEFAULT', 0
  while redis.call('EXISTS', key(fresh, 'meta')) == 1 do n = n + 1 fresh = 'chat-' .. n end
  redis.call('HSET', KEYS[1], 'current', fresh)
end
local name = current_or_create(ARGV[2], ARGV[3])
if of_type(key(name, 'refs'), 'hash') then unindex(redis.call('HKEYS', key(name, 'refs'))) end
redis.call('DEL', key(name, 'messages'), key(name, 'refs'), key(name, 'refseq'),
           key(name, 'answers'))
if not of_type(key(name, 'lock'), 'string') then redis.call('DEL', key(name, 'lock')) end
local meta = key(name, 'meta')
if not of_type(meta, 'hash') then redis.call('DEL', meta) end
local stored = redis.call('HMGET', meta, 'format', 'mcp')
if stored[1] ~= '$FORMAT' or not readable_mcp(stored[2]) then
  redis.call('DEL', meta)
  create(name, ARGV[2], '[]', ARGV[3])
end
local gen = new_generation()
redis.call('HSET', meta, 'updated', ARGV[3], 'gen', gen, 'epoch', gen, 'seq', 0, 'forgotten', 0,
           'bytes', 0)
redis.call('HDEL', meta, 'summary', 'summary_upto', 'summary_covered')
touch(name, ARGV[3], ARGV[4])
return describe(name)
"""
)

# ARGV: prefix, default_model, now, model, mcp_json, ttl_seconds
_UPDATE_SETTINGS = _lua(
    """
local damage = scope_damage()
if damage then return {'$DAMAGED', damage} end
local name = current_or_create(ARGV[2], ARGV[3])
touch(name, ARGV[3], ARGV[6])
local info = describe(name)
if info[2] ~= '$FORMAT' then return info end
redis.call('HSET', key(name, 'meta'), 'model', ARGV[4], 'mcp', ARGV[5])
return describe(name)
"""
)

# ARGV: prefix, user_ref, forgotten_ttl. The scope's ref index names the session storing the
# ref; a scope stored before the index existed gets it built once, on its first forget. A ref
# not stored (yet) is remembered for a while, so a turn still answering that message saves
# neither it nor its answer. Of identical stored copies, the one removed is the ref's own:
# counted from the newest, after the copies that newer refs name. Damaged keys it would use
# (the scope's, or the session's) are checked before anything is written, and answered
# {'$DAMAGED', what} or {'corrupt', name}; otherwise {number removed}.
_FORGET = _lua(
    """
-- Only the place's keys a deletion uses: junk elsewhere (its queue, its current name) does
-- not keep a deleted message stored.
local scope_keys, scope_types = scope_parts()
for _, part in ipairs({'state', 'refindex'}) do
  if not of_type(scope_keys[part], scope_types[part]) then
    return {'$DAMAGED', 'its ' .. part .. ' key has the wrong type'}
  end
end
local generations = redis.call('HGET', KEYS[1], 'generations')
if generations and not string.find(generations, '^%d+$') then
  return {'$DAMAGED', 'a counter is not a number'}
end
local index = prefix .. 'refindex'
local function not_found()
  redis.call('SET', prefix .. 'forgot:' .. ARGV[2], 1, 'EX', ARGV[3])
  return {0}
end
local function intact(session)  -- the keys and counters this script reads or writes
  for part, wanted in pairs({meta = 'hash', messages = 'list', refs = 'hash', refseq = 'zset'}) do
    if not of_type(key(session, part), wanted) then return false end
  end
  local counts = redis.call('HMGET', key(session, 'meta'), 'forgotten', 'bytes')
  for i = 1, 2 do
    if counts[i] and not string.find(counts[i], '^%-?%d+$') then return false end
  end
  return true
end
local name = redis.call('HGET', index, ARGV[2])
if not name then
  local marked = redis.call('HMGET', KEYS[1], 'current', 'refindex')
  if not marked[1] or marked[2] then return not_found() end
  if not of_type(KEYS[2], 'zset') then return {'$DAMAGED', 'its names key has the wrong type'} end
  local sessions = redis.call('ZRANGE', KEYS[2], 0, -1)
  for _, session in ipairs(sessions) do
    if not of_type(key(session, 'refs'), 'hash') then return {'corrupt', session} end
  end
  for _, session in ipairs(sessions) do
    for _, ref in ipairs(redis.call('HKEYS', key(session, 'refs'))) do
      redis.call('HSET', index, ref, session)
    end
  end
  redis.call('HSET', KEYS[1], 'refindex', 1)
  name = redis.call('HGET', index, ARGV[2])
  if not name then return not_found() end
end
if not intact(name) then return {'corrupt', name} end
redis.call('HDEL', index, ARGV[2])
local refs, order = key(name, 'refs'), key(name, 'refseq')
local stored = redis.call('HGET', refs, ARGV[2])
if not stored then return not_found() end
local messages, removed = key(name, 'messages'), 0
if #redis.call('LPOS', messages, stored, 'RANK', -1, 'COUNT', 2) < 2 then
  removed = redis.call('LREM', messages, -1, stored)
else  -- identical copies: the newer refs naming one of them come after this ref's own
  local newer, seq = 0, redis.call('ZSCORE', order, ARGV[2])
  if seq then
    local later = redis.call('ZRANGEBYSCORE', order, '(' .. seq, '+inf')
    if #later > 0 then
      for _, text in ipairs(redis.call('HMGET', refs, unpack(later))) do
        if text == stored then newer = newer + 1 end
      end
    end
  end
  local at = redis.call('LPOS', messages, stored, 'RANK', -(newer + 1))
  if at then  -- a stored message is a JSON object, so this placeholder is the only one
    redis.call('LSET', messages, at, 'forgotten')
    removed = redis.call('LREM', messages, -1, 'forgotten')
  end
end
redis.call('HDEL', refs, ARGV[2])
redis.call('ZREM', order, ARGV[2])
unrecord(name, {ARGV[2]})
if removed > 0 then
  local meta = key(name, 'meta')
  redis.call('HSET', meta, 'gen', new_generation())
  redis.call('HINCRBY', meta, 'forgotten', removed)
  if redis.call('HEXISTS', meta, 'bytes') == 1 then
    redis.call('HINCRBY', meta, 'bytes', -removed * #stored)
  end
end
return {removed}
"""
)

# ARGV: prefix, name, token, lease_ms, keep, limit. The summarizing lease, then the oldest
# messages the summary does not cover (at most `limit`, leaving the newest `keep`), followed
# by the next one (only its role is used): {epoch, summary, upto, covered, position of the
# first, how many, message...}; {'busy'} when the lease is another's; {} when there is
# nothing to add.
# A message's position is its seq: the newest stored message's is the meta's `seq` and the
# others count down from it (a forgotten message shifts the older ones' by one, so a
# summary may then cover one message less or more than it says).
_BEGIN_SUMMARY = _lua(
    """
local name = ARGV[2]
local meta, messages, lease = key(name, 'meta'), key(name, 'messages'), key(name, 'summarizing')
if not of_type(meta, 'hash') or not of_type(messages, 'list') or not of_type(lease, 'string') then
  return {}
end
if redis.call('EXISTS', meta) == 0 then return {} end
local holder = redis.call('GET', lease)
if holder and holder ~= ARGV[3] then return {'busy'} end
local m = redis.call('HMGET', meta, 'seq', 'epoch', 'summary', 'summary_upto', 'summary_covered')
local count = redis.call('LLEN', messages)
local seq = tonumber(m[1]) or count
local upto = m[3] and tonumber(m[4])
local uncovered = count
if upto then uncovered = math.max(0, math.min(count, seq - upto)) end
local wanted = math.min(uncovered - tonumber(ARGV[5]), tonumber(ARGV[6]))
if wanted <= 0 then return {} end
local first = count - uncovered
redis.call('SET', lease, ARGV[3], 'PX', ARGV[4])
local out = {m[2] or '', upto and m[3] or '', upto and m[4] or '', m[5] or '0',
             seq - count + 1 + first, wanted}
for _, v in ipairs(redis.call('LRANGE', messages, first, first + wanted)) do out[#out + 1] = v end
return out
"""
)

# ARGV: prefix, name, token, epoch, upto the summary was read with ('' for none), text, upto,
# covered. 1 when stored; 0, storing nothing, when another token holds the lease or the
# session was cleared, replaced or summarized meanwhile. The lease is released either way.
_SAVE_SUMMARY = _lua(
    """
local name = ARGV[2]
local meta, lease = key(name, 'meta'), key(name, 'summarizing')
if not of_type(meta, 'hash') or not of_type(lease, 'string') then return 0 end
local holder = redis.call('GET', lease)
if holder and holder ~= ARGV[3] then return 0 end
if holder then redis.call('DEL', lease) end
if redis.call('EXISTS', meta) == 0 then return 0 end
local m = redis.call('HMGET', meta, 'epoch', 'summary', 'summary_upto')
local upto = m[2] and m[3] or ''
if (m[1] or '') ~= ARGV[4] or upto ~= ARGV[5] then return 0 end
redis.call('HSET', meta, 'summary', ARGV[6], 'summary_upto', ARGV[7], 'summary_covered', ARGV[8])
return 1
"""
)

# ARGV: prefix, name, token
_RELEASE_SUMMARY = _lua(
    """
local lease = key(ARGV[2], 'summarizing')
if of_type(lease, 'string') and redis.call('GET', lease) == ARGV[3] then
  redis.call('DEL', lease)
end
return 1
"""
)

# ARGV: prefix, ref, record. Records where the answer to the stored user message `ref` went,
# in the session the ref index names; 0 when the ref is not stored.
_NOTE_ANSWER = _lua(
    """
local index = prefix .. 'refindex'
if not of_type(index, 'hash') then return 0 end
local name = redis.call('HGET', index, ARGV[2])
if not name or not readable_name(name) then return 0 end
local refs, answers = key(name, 'refs'), key(name, 'answers')
if not of_type(refs, 'hash') or redis.call('HEXISTS', refs, ARGV[2]) == 0 then return 0 end
unrecord(name, {})
redis.call('HSET', answers, ARGV[2], ARGV[3])
local ttl = redis.call('PTTL', refs)
if ttl > 0 then redis.call('PEXPIRE', answers, ttl) end
return 1
"""
)

# ARGV: prefix, name. {'none'} when the session holds no user message; {'corrupt'} when its
# messages key is junk; else {'ok', ref, record, messages...}: the newest user message and
# what follows it, oldest first. The ref is the newest one stored when it names that very
# message (a message stored without a ref, as the console's, has none).
_LAST_EXCHANGE = _lua(
    """
local name = ARGV[2]
local messages, refs, order = key(name, 'messages'), key(name, 'refs'), key(name, 'refseq')
if not of_type(messages, 'list') then return {'corrupt'} end
local tail, stop, found = {}, redis.call('LLEN', messages), false
while stop > 0 and not found do
  local start = math.max(stop - 16, 0)
  local page = redis.call('LRANGE', messages, start, stop - 1)
  for j = #page, 1, -1 do
    tail[#tail + 1] = page[j]
    local ok, message = pcall(cjson.decode, page[j])
    if ok and type(message) == 'table' and message.role == 'user' then
      found = true
      break
    end
  end
  stop = start
end
if not found then return {'none'} end
local ref, record = '', ''
if of_type(refs, 'hash') and of_type(order, 'zset') then
  local newest = redis.call('ZREVRANGE', order, 0, 0)[1]
  if newest and redis.call('HGET', refs, newest) == tail[#tail] then
    ref = newest
    if of_type(key(name, 'answers'), 'hash') then
      record = redis.call('HGET', key(name, 'answers'), ref) or ''
    end
  end
end
local out = {'ok', ref, record}
for i = #tail, 1, -1 do out[#out + 1] = tail[i] end
return out
"""
)

# ARGV: prefix, name, token, now, ttl_seconds, epoch, seq, ref, count, undo (1 or 0), the
# exchange's `count` stored messages, then the new answer's. Fenced as `_FINISH_TURN` (same
# replies, and {4} when the newest messages are no longer the exchange). `seq` counts the
# messages removed back and the new ones on, so the older messages keep their positions (a
# summary's `summary_upto` still names the same one); a new `epoch` (the lock is this
# rewrite's, so no live turn sees it) keeps a turn that began before it and lost its lock
# from saving, however `seq` moves later. A retried answer longer than the one it replaces
# can leave the session over its caps until the next turn's save trims it.
_REWRITE = _lua(
    """
local name, token = ARGV[2], ARGV[3]
local lock, meta, messages = key(name, 'lock'), key(name, 'meta'), key(name, 'messages')
if not of_type(lock, 'string') or not of_type(meta, 'hash') or not of_type(messages, 'list') then
  return {3}
end
local holder = redis.call('GET', lock)
local last_turn, epoch, seq_now, total, forgotten = unpack(
  redis.call('HMGET', meta, 'last_turn', 'epoch', 'seq', 'bytes', 'forgotten'))
if last_turn == token then return {1} end
if holder and holder ~= token then return {0} end
local function release() if holder then redis.call('DEL', lock) end end
if (epoch or '') ~= ARGV[6] then
  release()
  return {holder and 2 or 0}
end
for _, counter in ipairs({seq_now, forgotten}) do
  if counter and not string.find(counter, '^%-?%d+$') then release() return {3} end
end
if not holder and (redis.call('HGET', KEYS[1], 'current') ~= name or seq_now ~= ARGV[7]) then
  return {0}
end
local count, first = tonumber(ARGV[9]), 11
local tail = redis.call('LRANGE', messages, -count, -1)
local same = #tail == count
for i = 1, count do
  if same and tail[i] ~= ARGV[first + i - 1] then same = false end
end
if not same then release() return {4} end
local dropped = ARGV[10] == '1' and count or count - 1
local removed = 0
for i = count - dropped + 1, count do removed = removed + #tail[i] end
redis.call('LTRIM', messages, 0, -dropped - 1)
local at = first + count
local added, added_bytes = #ARGV - at + 1, 0
if added > 0 then
  redis.call('RPUSH', messages, unpack(ARGV, at))
  for i = at, #ARGV do added_bytes = added_bytes + #ARGV[i] end
end
total = tonumber(total)
if total then
  total = total - removed + added_bytes
else  -- stored before sessions counted their bytes
  total = 0
  for _, m in ipairs(redis.call('LRANGE', messages, 0, -1)) do total = total + #m end
end
redis.call('HINCRBY', meta, 'seq', added - dropped)
local gen = new_generation()
redis.call('HSET', meta, 'gen', gen, 'epoch', gen, 'updated', ARGV[4], 'last_turn', token,
           'bytes', total)
local ref = ARGV[8]
if ARGV[10] == '1' and ref ~= '' then
  if of_type(key(name, 'refs'), 'hash') then redis.call('HDEL', key(name, 'refs'), ref) end
  if of_type(key(name, 'refseq'), 'zset') then redis.call('ZREM', key(name, 'refseq'), ref) end
  if of_type(prefix .. 'refindex', 'hash') then unindex({ref}) end
  unrecord(name, {ref})
end
release()
touch(name, ARGV[4], ARGV[5])
return {1}
"""
)

# Shared by the deletions: remove one session and everything stored with it (its lock stays
# until its turn ends or its lease lapses: the turn learns of the deletion from the tombstone
# of its epoch, `deleted:{epoch}`, kept for `deleted_ttl` seconds, and saves nothing).
_DELETION = """
local function delete_session(name, deleted_ttl)
  local meta = key(name, 'meta')
  local epoch = of_type(meta, 'hash') and redis.call('HGET', meta, 'epoch')
  if epoch and epoch ~= '' then
    redis.call('SET', prefix .. 'deleted:' .. epoch, 1, 'EX', deleted_ttl)
  end
  local index = prefix .. 'refindex'
  if of_type(index, 'hash') then
    if of_type(key(name, 'refs'), 'hash') then
      unindex(redis.call('HKEYS', key(name, 'refs')))
    else  -- its refs unreadable: find its entries in the index itself
      local entries = redis.call('HGETALL', index)
      for i = 1, #entries, 2 do
        if entries[i + 1] == name then redis.call('HDEL', index, entries[i]) end
      end
    end
  end
  redis.call('DEL', meta, key(name, 'messages'), key(name, 'refs'), key(name, 'refseq'),
             key(name, 'answers'),  -- where its answers went (/retry, /undo)
             key(name, 'summarizing'))  -- a summary being written is not saved without meta
  if of_type(KEYS[2], 'zset') then redis.call('ZREM', KEYS[2], name) end
end
"""

# ARGV: prefix, name, default_model, now, ttl_seconds, deleted_ttl. {} when there is no such
# session; else {fresh}: the name of the fresh empty session made current when the deleted
# one was current ('' when it was not). Damaged place keys are dropped first, as /clear does.
_DELETE_SESSION = _lua(
    _DELETION
    + """
repair_scope()
local name = ARGV[2]
if redis.call('EXISTS', key(name, 'meta')) == 0 then return {} end
delete_session(name, ARGV[6])
local current = redis.call('HGET', KEYS[1], 'current')
if current and current ~= name and readable_name(current) then return {''} end
if not current and name ~= '$DEFAULT' then return {''} end
local fresh, n = '$DEFAULT', 0
while redis.call('EXISTS', key(fresh, 'meta')) == 1 do n = n + 1 fresh = 'chat-' .. n end
mark_new_scope()
create(fresh, ARGV[3], '[]', ARGV[4])
redis.call('HSET', KEYS[1], 'current', fresh)
touch(fresh, ARGV[4], ARGV[5])
return {fresh}
"""
)

# ARGV: prefix, deleted_ttl. Every session the place knows (its names and its current one)
# and the place's own keys (state with its options, names, index). Returns how many sessions
# went. Left to lapse by themselves: claims (message ids answered), the queue, forgotten ids.
_FORGET_PLACE = _lua(
    _DELETION
    + """
local names, seen, count = {}, {}, 0
if of_type(KEYS[2], 'zset') then names = redis.call('ZRANGE', KEYS[2], 0, -1) end
local current = of_type(KEYS[1], 'hash') and redis.call('HGET', KEYS[1], 'current')
if current and readable_name(current) then names[#names + 1] = current end
for _, name in ipairs(names) do
  if not seen[name] then
    seen[name] = true
    if redis.call('EXISTS', key(name, 'meta')) == 1 then count = count + 1 end
    delete_session(name, ARGV[2])
  end
end
redis.call('DEL', KEYS[1], KEYS[2], prefix .. 'refindex')
return count
"""
)

_SUMMARY_FIELDS = 7


def _summary_of(text: str | None, upto: str | None, covered: str | None) -> Summary | None:
    """A stored summary; None when none is stored (or what is stored is not one)."""
    try:
        return None if not text or upto is None else Summary(text, int(covered or 0), int(upto))
    except ValueError:
        return None


_SWAP_OPTION = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"""


def _stored_sizes(texts: list[str]) -> list[int]:
    """Bytes of each stored message, as the scripts count them (`#` in Lua)."""
    if all(map(str.isascii, texts)):
        return list(map(len, texts))
    return list(map(stored_bytes, texts))


# KEYS: the places zset, their servers hash. ARGV: scope, its server ('' keeps the one
# known), now, the oldest time kept, how many are kept (-1: forget the scope instead).
_NOTE_PLACE = (
    _DAMAGED_FUNCTION
    + _NOTE_PLACE_FUNCTION
    + """
if tonumber(ARGV[5]) < 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  if damaged(redis.pcall('HDEL', KEYS[2], ARGV[1])) then redis.call('DEL', KEYS[2]) end
  return 0
end
note_place(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
return 1
"""
)


def _refuse_damaged(reply: Sequence[ScriptArg]) -> None:
    if reply and reply[0] == DAMAGED:
        raise DamagedState(str(reply[1]))


class _Outages:
    """Errors that mean storage cannot be used now, raised as the one error users are shown
    for them (`RedisStore._unavailable`); everything else as it is. No timer: alone, it is
    `RedisStore._available` where the shared connection keeps the deadline."""

    __slots__ = ("_store",)

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: object
    ) -> bool:
        if not isinstance(error, Exception):
            return False
        outage = self._store._unavailable(error)
        if outage is None:
            return False
        raise outage from error


class RedisStore:
    """Sessions in Redis. The client is injected; `from_url` builds (and then owns) one."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        policy: StorePolicy,
        *,
        owns_client: bool = False,
        call_timeout: float = CALL_TIMEOUT_SECONDS,
        pipeline: AutoPipeline | None = None,
    ):
        """`pipeline`: the scripts' shared connection to a single Redis (`_auto_pipeline`),
        owned by the store from then on."""
        self._redis = client
        self._pipeline = pipeline
        self._policy = policy
        self._owns_client = owns_client
        self._call_timeout = call_timeout
        self._in_flight = (
            asyncio.Semaphore(MAX_CONNECTIONS) if isinstance(client, RedisCluster) else None
        )
        """redis-py's cluster client has no blocking pool: past `max_connections` calls in
        flight to one node it raises at once, which a busy bot (a thousand channels talking)
        would report as an outage. Calls past the limit wait here instead, as they wait for
        the single server's blocking pool, within the same call deadline."""
        self._reloading: asyncio.Task[None] | None = None
        """The cluster slot map's reload under way (`_reload_cluster_map`), if any."""
        self._recent = RecentCache(policy.history_cache_bytes)
        self.stats = StoreStats()
        self._notes_in_turns = not isinstance(client, RedisCluster)
        """On a single Redis, `begin_turn` notes the place in its own step (a cluster keeps
        the record in a slot of its own, which a script of the place cannot touch)."""
        self._noted = PlaceNotes()
        """Places noted by `begin_turn`, so `note_place` need not note them again."""
        self._outages = _Outages(self)
        self._load_bytes = 0
        """The largest budget asked for so far: windows are loaded and kept to it, so a turn
        whose new message is shorter than the last one's still finds its history cached."""

        cluster = isinstance(client, RedisCluster)
        library = None if pipeline is None else FunctionLibrary(_single_redis(_lua("")))

        def register(source: str) -> _Script:
            if not cluster:
                source = _single_redis(source)
            return _Script(client.register_script(source), pipeline, client, library)

        self._begin = register(_BEGIN_TURN)
        self._claim = register(_CLAIM)
        self._settle = register(_SETTLE_CLAIM)
        self._finish = register(_FINISH_TURN)
        self._extend = register(_EXTEND_LOCK)
        self._describe = register(_DESCRIBE_CURRENT)
        self._list = register(_LIST)
        self._create = register(_CREATE)
        self._switch = register(_SWITCH)
        self._clear = register(_CLEAR)
        self._update = register(_UPDATE_SETTINGS)
        self._forget = register(_FORGET)
        self._begin_summary = register(_BEGIN_SUMMARY)
        self._save_summary = register(_SAVE_SUMMARY)
        self._release_summary = register(_RELEASE_SUMMARY)
        self._note = register(_NOTE_ANSWER)
        self._last = register(_LAST_EXCHANGE)
        self._rewrite = register(_REWRITE)
        self._swap_option = register(_SWAP_OPTION)
        self._delete = register(_DELETE_SESSION)
        self._forget_place = register(_FORGET_PLACE)
        self._note_place = register(_NOTE_PLACE)
        self._usage = RedisUsage(client, policy, usage_key, scope_key, register)

    @classmethod
    def from_url(
        cls,
        url: str,
        policy: StorePolicy,
        *,
        call_timeout: float = CALL_TIMEOUT_SECONDS,
        cluster: bool = False,
    ) -> RedisStore:
        """`cluster`: `url` names one node of a Redis Cluster, which tells the client the
        rest. Every script and transaction touches the keys of one place, which share a hash
        slot (`{scope}` in each key), so each runs whole on the node that owns the place."""
        if cluster:
            nodes = RedisCluster.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                decode_responses=True,
                socket_connect_timeout=2,
                socket_timeout=None,
                health_check_interval=30,
            )
            return cls(nodes, policy, owns_client=True, call_timeout=call_timeout)
        pool = _WaitingPool.from_url(
            url,
            # rediss:// and unix:// URLs name connection classes of their own, which win
            **({"connection_class": _HiredisPackedConnection} if HIREDIS_AVAILABLE else {}),
            max_connections=MAX_CONNECTIONS,  # past them a call waits: its deadline applies
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=None,  # redis-py's default (5 s) would wrap every command in a task
            health_check_interval=30,
        )
        client = aioredis.Redis.from_pool(pool)
        pipeline = _auto_pipeline(url, pool, call_timeout)
        return cls(client, policy, owns_client=True, call_timeout=call_timeout, pipeline=pipeline)

    async def close(self) -> None:
        if self._reloading is not None:
            self._reloading.cancel()
            await asyncio.gather(self._reloading, return_exceptions=True)
        if self._pipeline is not None:
            await self._pipeline.close()
        if self._owns_client:
            await self._redis.aclose()

    def _reload_cluster_map_soon(self) -> None:
        """After a cluster call ran out of time: one reload at a time, in the background (the
        call that saw it has already failed, and the next should not wait for it)."""
        if not isinstance(self._redis, RedisCluster):
            return
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self._reload_cluster_map(self._redis))

    async def _reload_cluster_map(self, cluster: RedisCluster) -> None:
        """Ask the cluster again which node serves which slot, bypassing nodes that do not
        answer. Needed for a primary that is frozen rather than gone (SIGSTOP, a stalled VM,
        a network that drops packets): its replica takes over, but redis-py keeps sending
        that primary's slots to it, and our call deadline cancels each call before redis-py
        sees an error of its own, the only thing that makes it reload its slot map
        (`RedisCluster._execute_command` on a ConnectionError or TimeoutError). So every call
        on those slots failed at the deadline for as long as the node stayed frozen.

        The alternative, a per-read `socket_timeout` on the cluster client so that redis-py
        raises its own TimeoutError, was not taken: it wraps every command in a timeout (a
        tenth of a turn, see `CALL_TIMEOUT_SECONDS`), and redis-py then reloads the map
        through `RedisCluster.initialize`, which asks the startup nodes one by one in random
        order (a frozen one among them: `socket_timeout` then bounds each ask, but every call
        of the process waits behind that lock meanwhile) and, if cut off, closes every
        connection of every node, in-flight calls' included.

        Here every known node is PINGed at once, each bounded by `CLUSTER_PROBE_SECONDS`; if
        none is silent the call was merely slow (or queued) and nothing is reloaded.
        Otherwise `NodesManager.initialize` builds the map from the first node that answers
        `CLUSTER SLOTS` with every slot covered, the silent node asked last (redis-py's own
        `last_failed_node_name`), all of it bounded by the call deadline. Cut off, it changes
        nothing (it builds the new map aside and swaps it in at the end) and the next call
        past the deadline tries again; a map still naming the frozen node (no failover yet)
        is simply kept. Connections to the frozen node are not ours to close: each cancelled
        call's connection was already dropped by redis-py (`Connection.read_response`)."""
        nodes = cluster.nodes_manager
        known = list(nodes.nodes_cache.values())

        async def silent(node: ClusterNode) -> bool:
            try:
                async with asyncio.timeout(CLUSTER_PROBE_SECONDS):
                    await node.execute_command("PING")
            except ResponseError:
                return False  # it answered (LOADING, MASTERDOWN): alive
            except (RedisError, OSError):  # a timeout included
                return True
            return False

        found = await asyncio.gather(*(silent(node) for node in known))
        quiet = [node.name for node, is_silent in zip(known, found, strict=True) if is_silent]
        if not quiet:
            return
        log.warning(
            "storage: Redis Cluster node(s) %s do not answer; reloading the slot map from "
            "the others",
            ", ".join(quiet),
        )
        for name in quiet:
            nodes.move_node_to_end_of_cached_nodes(name)
        try:
            async with asyncio.timeout(self._call_timeout):
                await nodes.initialize(last_failed_node_name=quiet[0])
        except (RedisError, OSError) as error:  # a timeout included: the next deadline retries
            log.warning(
                "storage: the Redis Cluster slot map was not reloaded: %s", type(error).__name__
            )

    def _available(
        self, seconds: float | None = None, *, pipelined: bool = False
    ) -> AbstractAsyncContextManager[None]:
        """Turn a lost or silent connection into the one error users are shown for it
        (`_unavailable`), and give up at the call deadline (`seconds`, else the store's).
        No later call reads the reply of a call cut off mid-reply: redis-py drops its
        connection, and the scripts' shared connection drops the reply (`AutoPipeline`),
        and is itself replaced if it has been silent for half the deadline.

        `pipelined`: the calls inside go only through `_Script` and the shared connection,
        where there is one, and that connection gives each command the store's deadline
        itself, with one timer for all of them: then no timer of its own is set here."""
        if pipelined and self._pipeline is not None:
            return self._outages
        return self._timed(seconds)

    @asynccontextmanager
    async def _timed(self, seconds: float | None) -> AsyncIterator[None]:
        async with self._outages, asyncio.timeout(seconds or self._call_timeout):
            if self._in_flight is None:
                yield
            else:
                async with self._in_flight:
                    yield

    def _unavailable(self, error: Exception) -> StoreUnavailable | None:
        """The error users are shown for `error` when it means storage cannot be used now;
        None for anything else (a bug, or junk where a script looked), raised as it is."""
        if isinstance(
            error,
            (
                RedisConnectionError,
                RedisTimeoutError,
                OSError,
                ClusterError,  # a slot without a primary: during a failover
                RedisClusterException,  # no node reachable, or a slot not covered
                TryAgainError,  # a slot moving between nodes
            ),
        ):
            if isinstance(error, TimeoutError):  # our deadline: perhaps a frozen cluster node
                self._reload_cluster_map_soon()
                if self._pipeline is not None:  # or a dead connection that never said so
                    self._pipeline.drop_if_silent(self._call_timeout / 2)
        elif isinstance(error, OutOfMemoryError):
            # Under `maxmemory-policy noeviction` Redis refuses writes when full, rather than
            # dropping sessions: an outage to explain, not a bug to trace.
            log.warning("storage: Redis is full (maxmemory reached) and refuses writes")
        elif isinstance(error, ResponseError) and str(error).startswith(_SCRIPT_REFUSED_BY_CLUSTER):
            pass  # a script on a slot being moved away (see `_PRELUDE`), or on a cluster that
            # is down: refused before it wrote anything, like a node that is not there
        else:
            return None
        self.stats.unavailable += 1
        return StoreUnavailable()

    async def ping(self) -> None:
        try:
            async with self._available():
                await self._redis.ping()
        except RedisError as error:  # e.g. a database number the server does not have
            raise StoreUnavailable() from error

    @staticmethod
    def _keys(scope: str) -> list[str]:
        return [scope_key(scope, "state"), scope_key(scope, "names")]

    @staticmethod
    def _prefix(scope: str) -> str:
        return scope_key(scope, "")

    async def begin_turn(self, scope: str, ticket: Ticket, budget_bytes: int, lock_ms: int) -> Turn:
        self._load_bytes = load_bytes = max(self._load_bytes, budget_bytes)
        cached = self._recent.get(scope)
        if cached is not None and not cached.can_serve(budget_bytes):
            cached = None
        args: list[ScriptArg] = [self._prefix(scope), ticket.token, lock_ms, load_bytes]
        args += [self._policy.default_model, time.time(), ticket.place, ticket.claim or ""]
        args += [self._policy.claim_seconds, TICKET_TTL_MS]
        if cached is not None:
            args += [cached.name, cached.generation, cached.sequence, cached.count]
        else:
            args += ["", "", 0, 0]
        policy = self._policy
        args += [policy.history_cap, policy.ttl_seconds]
        args.append(policy.history_cap_bytes - policy.message_cap_bytes)
        # Nothing of this place cached here (a first turn in this process): its newest
        # messages are read by a plain LRANGE in the same transaction, for the session it
        # most likely uses, rather than copied through Lua (several times slower per byte).
        # The script leaves them to this read if it guessed the session; else it sends them.
        reading = stored_name(DEFAULT_SESSION) if cached is None and self._pipeline else ""
        args.append(reading)
        keys = self._keys(scope)
        noting = self._notes_in_turns and self._noted.due(scope)
        if noting:
            keys += [places_key(), place_servers_key()]
            args += [scope, time.time(), PLACES_KEPT_SECONDS, PLACES_KEPT, ticket.server or ""]
        newest: list[str] = []
        async with self._available(pipelined=True):
            if reading:
                lrange = (
                    "LRANGE",
                    session_key(scope, reading, "messages"),
                    -FIRST_READ_MESSAGES,
                    -1,
                )
                reply, newest = await self._begin.then_read(keys, args, lrange)
            else:
                reply = await self._begin(keys=keys, args=args)
            if reply[0] == "ok" and reply[3 + _SUMMARY_FIELDS] == "read":
                reply[10 + _SUMMARY_FIELDS], reply[3 + _SUMMARY_FIELDS] = await self._window_read(
                    scope, reading, newest, int(reply[_SUMMARY_FIELDS]), load_bytes
                )
        status = reply[0]
        if noting and status == "ok":
            self._noted.noted(scope)
        if status == "claimed":
            raise AlreadyClaimed(answered=reply[1] == "answered")
        if status == "corrupt":
            raise CorruptSession(shown_name(reply[1]))
        if status == "damaged":
            raise DamagedState(reply[1])
        if status == "busy":
            raise SessionBusy()
        name = reply[1]
        stamp = reply[1 + _SUMMARY_FIELDS : 6 + _SUMMARY_FIELDS]
        generation, sequence, mode, epoch, persona = stamp
        summary = _summary_of(*reply[6 + _SUMMARY_FIELDS : 9 + _SUMMARY_FIELDS])
        last_answered = reply[9 + _SUMMARY_FIELDS]
        loaded: list[str] = reply[10 + _SUMMARY_FIELDS]
        try:
            session = session_info(reply[1 : 1 + _SUMMARY_FIELDS])
            messages = decode_message_array(shown_name(name), "[" + ",".join(loaded) + "]")
        except CorruptSession:
            self._recent.drop(scope)
            settings = SessionSettings(self._policy.default_model)
            placeholder = SessionInfo(shown_name(name), settings, 0, 0, 0)
            turn = Turn(scope, placeholder, [], 0, ticket.token, claim=ticket.claim)
            await self.finish_turn(turn, [])
            raise
        if mode != "delta" or cached is None:
            self.stats.cache_misses += 1
            base = RecentWindow(name, generation, 0, 0, load_bytes, mode == "all")
        elif cached.complete and cached.bound < load_bytes:  # holding everything, it may
            base = replace(cached, bound=load_bytes)  # keep up to any bound
        else:  # the same window: a turn that brings nothing new keeps it as it is
            base = cached
        if mode == "delta" and cached is not None:
            self.stats.cache_hits += 1
        window = base.extended(
            messages, _stored_sizes(loaded), int(sequence), session.message_count
        )
        self._recent.put(scope, window)
        recent, used, as_stored = window.newest_within(budget_bytes)
        count = session.message_count
        return Turn(
            scope,
            session,
            recent,
            used,
            ticket.token,
            as_stored,
            ticket.claim,
            epoch,
            int(sequence),
            persona or None,
            summary,
            None if summary is None else max(0, min(count, int(sequence) - summary.upto)),
            answered_id(last_answered),
        )

    async def _window_read(
        self, scope: str, name: str, newest: list[str], count: int, budget: int
    ) -> tuple[list[str], str]:
        """The window of a first turn that read its session's newest messages itself
        (`begin_turn`): as the script cuts it, the newest that fit `budget`, and 'all' when
        that is every message. When all it read fit and there are more, it reads them all (the
        turn holds the session's lock, so they are the same messages)."""
        sizes = _stored_sizes(newest)
        start, used = len(newest), 0
        while start > 0 and used + sizes[start - 1] <= budget:
            start -= 1
            used += sizes[start]
        if start == 0 and len(newest) < count and self._pipeline is not None:
            every = await self._pipeline.call("LRANGE", session_key(scope, name, "messages"), 0, -1)
            return await self._window_read(scope, name, every, len(every), budget)
        window = newest[start:]
        return window, "all" if len(window) == count else "window"

    async def claim(self, scope: str, claim: str, token: str, lease_ms: int) -> None:
        args: list[ScriptArg] = [self._prefix(scope), claim, token, lease_ms]
        async with self._available():
            holder = await self._claim(keys=self._keys(scope), args=args)
        if holder != "ok":
            raise AlreadyClaimed(answered=holder == "answered")

    async def settle_claim(self, scope: str, claim: str, token: str, *, answered: bool) -> None:
        args: list[ScriptArg] = [self._prefix(scope), claim, token, int(answered)]
        args += [self._policy.claim_seconds, self._policy.ttl_seconds]
        async with self._available():
            await self._settle(keys=self._keys(scope), args=args)

    async def note_place(self, scope: str, server: str | None = None) -> None:
        """Written on its own only when no turn of this process noted the place lately: on a
        single Redis, `begin_turn` notes it in the same step (so a first turn in a place
        takes no third round trip), before the model is called, as the engine's call would."""
        if not self._noted.due(scope):
            return
        now = time.time()
        args: list[ScriptArg] = [scope, server or "", now, now - PLACES_KEPT_SECONDS, PLACES_KEPT]
        async with self._available():
            await self._note_place(keys=[places_key(), place_servers_key()], args=args)

    async def recent_places(self) -> list[NotedPlace]:
        """Junk where the places' servers are kept is dropped: they are unknown then (noting a
        place with its server repairs it too, but one without leaves that key alone)."""
        since = time.time() - PLACES_KEPT_SECONDS
        async with self._available():
            async with self._redis.pipeline(transaction=False) as reads:
                reads.zrevrangebyscore(places_key(), "+inf", since)
                reads.hgetall(place_servers_key())
                found, servers = await reads.execute(raise_on_error=False)
            if isinstance(found, Exception):
                raise found
            if isinstance(servers, Exception):
                if not isinstance(servers, ResponseError):
                    raise servers
                await self._redis.delete(place_servers_key())
                servers = {}
        return [NotedPlace(str(scope), servers.get(scope)) for scope in found]

    async def finish_turn(
        self,
        turn: Turn,
        added: Sequence[Message],
        user_ref: str | None = None,
        usage: Charge | None = None,
        encoded: Sequence[str] | None = None,
    ) -> bool:
        policy = self._policy
        charged = usage.usage if usage is not None else NOTHING_USED
        name, stored = stored_name(turn.session.name), policy.check_sizes(added, encoded=encoded)
        args: list[ScriptArg] = [
            self._prefix(turn.scope),
            name,
            turn.lock_token,
            policy.history_cap,
            time.time(),
            policy.ttl_seconds,
            user_ref or "",
            turn.claim or "",
            policy.claim_seconds,
            policy.history_cap_bytes,
            turn.epoch,
            turn.sequence,
            turn.session.settings.model,
            mcp_json(turn.session.settings),
            "" if usage is None else usage.session,
            charged.input_tokens,
            charged.output_tokens,
            charged.estimated_tokens,
            *stored,
        ]
        async with self._available(pipelined=True):
            reply = await self._finish(keys=self._keys(turn.scope), args=args)
        if reply[0] == 2:
            self._recent.drop(turn.scope)
            raise SessionCleared()
        if reply[0] == 3:
            self._recent.drop(turn.scope)
            raise CorruptSession(turn.session.name)
        if len(reply) == 4:
            generation, sequence, count = reply[1], int(reply[2]), int(reply[3])
            self._remember_saved(turn, name, added, stored, generation, sequence, count)
        return bool(reply[0])

    def _remember_saved(
        self,
        turn: Turn,
        name: str,
        added: Sequence[Message],
        stored: list[str],
        generation: str,
        sequence: int,
        count: int,
    ) -> None:
        """Extend the cached window by the messages the turn saved (`added`, `stored` as
        stored, in the session stored as `name`), when it is the window the turn began from
        (the saved messages follow it directly); otherwise forget it."""
        scope, cached = turn.scope, self._recent.get(turn.scope)
        if (
            cached is None
            or cached.name != name
            or cached.generation != generation
            or cached.sequence + len(stored) != sequence
        ):
            self._recent.drop(scope)
            return
        saved = [copy for copy in map(as_reloaded, added) if copy is not None]
        if len(saved) != len(added):  # decoded, as a reload sees them (JSON has no tuples...)
            try:
                saved = decode_message_array(turn.session.name, "[" + ",".join(stored) + "]")
            except CorruptSession:  # saved all the same; the next load reports it
                self._recent.drop(scope)
                return
        self._recent.put(scope, cached.extended(saved, _stored_sizes(stored), sequence, count))

    async def extend_lock(self, turn: Turn, lock_ms: int) -> bool:
        args: list[ScriptArg] = [
            self._prefix(turn.scope),
            stored_name(turn.session.name),
            turn.lock_token,
            lock_ms,
            turn.claim or "",
        ]
        async with self._available():
            return bool(await self._extend(keys=self._keys(turn.scope), args=args))

    async def current_session(self, scope: str) -> SessionInfo:
        async with self._available():
            row = await self._describe(keys=self._keys(scope), args=[self._prefix(scope)])
        _refuse_damaged(row)
        if row[1] == "":  # an untouched scope: report the session it would create
            settings = SessionSettings(self._policy.default_model)
            return SessionInfo(shown_name(row[0]), settings, 0, 0.0, 0.0)
        return session_info(row)

    async def list_sessions(self, scope: str) -> list[SessionInfo]:
        async with self._available():
            rows = await self._list(
                keys=self._keys(scope),
                args=[
                    self._prefix(scope),
                    self._policy.sessions_per_place,
                    self._policy.ttl_seconds,
                ],
            )
        _refuse_damaged(rows)
        summaries = [rows[i : i + _SUMMARY_FIELDS] for i in range(0, len(rows), _SUMMARY_FIELDS)]
        return listed_sessions(summaries, self._policy.default_model)

    async def create_session(self, scope: str, name: str, settings: SessionSettings) -> SessionInfo:
        args: list[ScriptArg] = [
            self._prefix(scope),
            stored_name(name),
            settings.model,
            mcp_json(settings),
            time.time(),
            self._policy.ttl_seconds,
            self._policy.sessions_per_place,
        ]
        self._recent.drop(scope)  # the window would not be reused after this
        async with self._available():
            row = await self._create(keys=self._keys(scope), args=args)
        if not row:
            raise InvalidInput(f"A session named {name!r} exists already; use /load {name}.")
        if len(row) == 1:
            raise SessionLimit(self._policy.sessions_per_place)
        return session_info(row)

    async def switch_session(self, scope: str, name: str) -> SessionInfo:
        self._recent.drop(scope)  # the window would not be reused after this
        async with self._available():
            row = await self._switch(
                keys=self._keys(scope),
                args=[
                    self._prefix(scope),
                    stored_name(name),
                    time.time(),
                    self._policy.ttl_seconds,
                ],
            )
        if not row:
            raise UnknownSession(f"There is no session named {name!r}; /list shows them.")
        _refuse_damaged(row)
        return session_info(row)

    async def clear_session(self, scope: str) -> SessionInfo:
        args: list[ScriptArg] = [
            self._prefix(scope),
            self._policy.default_model,
            time.time(),
            self._policy.ttl_seconds,
        ]
        self._recent.drop(scope)  # the window would not be reused after this
        async with self._available():
            return session_info(await self._clear(keys=self._keys(scope), args=args))

    async def update_settings(self, scope: str, settings: SessionSettings) -> SessionInfo:
        args: list[ScriptArg] = [
            self._prefix(scope),
            self._policy.default_model,
            time.time(),
            settings.model,
            mcp_json(settings),
            self._policy.ttl_seconds,
        ]
        async with self._available():
            row = await self._update(keys=self._keys(scope), args=args)
        _refuse_damaged(row)
        return session_info(row)

    async def forget_message(self, scope: str, user_ref: str) -> bool:
        self._recent.drop(scope)  # the window would not be reused after this
        async with self._available():
            args: list[ScriptArg] = [self._prefix(scope), user_ref, FORGOTTEN_TTL_SECONDS]
            reply = await self._forget(keys=self._keys(scope), args=args)
        _refuse_damaged(reply)
        if reply[0] == "corrupt":
            raise CorruptSession(shown_name(str(reply[1])))
        return bool(reply[0])

    async def delete_session(self, scope: str, name: str) -> str | None:
        args: list[ScriptArg] = [
            self._prefix(scope),
            stored_name(name),
            self._policy.default_model,
            time.time(),
            self._policy.ttl_seconds,
            DELETED_TTL_SECONDS,
        ]
        self._recent.drop(scope)  # the window would not be reused after this
        async with self._available():
            reply = await self._delete(keys=self._keys(scope), args=args)
        if not reply:
            raise UnknownSession(f"There is no session named {name!r}; /list shows them.")
        return shown_name(str(reply[0])) or None

    async def forget_place(self, scope: str) -> int:
        self._recent.drop(scope)
        self._noted.forget(scope)
        async with self._available():
            count = await self._forget_place(
                keys=self._keys(scope), args=[self._prefix(scope), DELETED_TTL_SECONDS]
            )
            await self._note_place(
                keys=[places_key(), place_servers_key()], args=[scope, "", 0, 0, -1]
            )
        return int(count)

    async def scope_option(self, scope: str, option: str) -> str | None:
        try:
            async with self._available():
                value = await self._redis.hget(scope_key(scope, "state"), f"opt:{option}")
        except ResponseError:  # a state key of the wrong type: options read as never set
            return None
        return None if value is None else str(value)

    async def set_scope_option(self, scope: str, option: str, value: str | None) -> None:
        state = scope_key(scope, "state")
        try:
            async with self._available(), self._redis.pipeline(transaction=True) as tx:
                if value is None:
                    tx.hdel(state, f"opt:{option}")
                else:
                    tx.hset(state, f"opt:{option}", value)
                if self._policy.ttl_seconds:
                    tx.expire(state, self._policy.ttl_seconds)
                await tx.execute()
        except ResponseError:
            raise DamagedState("its state key has the wrong type") from None

    async def swap_scope_option(self, scope: str, option: str, expected: str, value: str) -> bool:
        args: list[ScriptArg] = [f"opt:{option}", expected, value, self._policy.ttl_seconds]
        try:
            async with self._available():
                swapped = await self._swap_option(keys=[scope_key(scope, "state")], args=args)
        except ResponseError:
            raise DamagedState("its state key has the wrong type") from None
        return bool(swapped)

    async def read_history(self, scope: str, name: str) -> list[Message]:
        async with self._available():
            raw = await self._redis.lrange(session_key(scope, stored_name(name), "messages"), 0, -1)
        return decode_messages(name, [str(item) for item in raw])

    async def note_answer(self, scope: str, ref: str, replies: Sequence[str]) -> None:
        args: list[ScriptArg] = [self._prefix(scope), ref, answer_record(replies)]
        async with self._available(pipelined=True):
            await self._note(keys=self._keys(scope), args=args)

    async def last_exchange(self, turn: Turn) -> Exchange | None:
        name = turn.session.name
        args: list[ScriptArg] = [self._prefix(turn.scope), stored_name(name)]
        async with self._available():
            reply = await self._last(keys=self._keys(turn.scope), args=args)
        if reply[0] == "corrupt":
            raise CorruptSession(name)
        if reply[0] != "ok":
            return None
        return exchange_from(name, [str(m) for m in reply[3:]], reply[1], reply[2])

    async def rewrite_last_exchange(
        self, turn: Turn, exchange: Exchange, answer: Sequence[Message] | None
    ) -> bool:
        stored = [] if answer is None else self._policy.check_sizes(answer)
        args: list[ScriptArg] = [
            self._prefix(turn.scope),
            stored_name(turn.session.name),
            turn.lock_token,
            time.time(),
            self._policy.ttl_seconds,
            turn.epoch,
            turn.sequence,
            exchange.ref or "",
            len(exchange.stored),
            int(answer is None),
            *exchange.stored,
            *stored,
        ]
        self._recent.drop(turn.scope)  # the window would not be reused after this
        async with self._available():
            reply = await self._rewrite(keys=self._keys(turn.scope), args=args)
        if reply[0] == 2:
            raise SessionCleared()
        if reply[0] == 3:
            raise CorruptSession(turn.session.name)
        return bool(reply[0] == 1)

    async def admit(self, admission: Admission) -> Refusal | None:
        async with self._available(pipelined=True):
            return await self._usage.admit(admission)

    async def record_usage(self, charge: Charge, *, session: bool = True) -> None:
        async with self._available(pipelined=True):
            await self._usage.record(charge, session=session)

    async def session_usage(self, scope: str, name: str, server: str, day: str) -> SessionUsage:
        try:
            async with self._available():
                return await self._usage.session_usage(scope, name, server, day)
        except ResponseError:  # junk in the counters' place: nothing readable counted
            return SessionUsage()

    async def server_usage(self, server: str, days: list[str]) -> ServerUsage:
        async with self._available():
            return await self._usage.server_usage(server, days)

    async def import_sessions(
        self, scope: str, sessions: dict[str, list[Message]], settings: SessionSettings
    ) -> dict[str, int]:
        now = time.time()
        policy = self._policy
        fitted = policy.stored_for_import(sessions)
        kept = {stored_name(name): stored for name, stored in fitted.items()}
        names, index = scope_key(scope, "names"), scope_key(scope, "refindex")
        self._recent.drop(scope)  # the window would not be reused after this
        deadline = max(IMPORT_TIMEOUT_SECONDS, self._call_timeout)
        async with self._available(deadline):
            async with self._redis.pipeline(transaction=False) as reads:
                reads.zrange(names, 0, -1)
                for name in kept:
                    reads.hkeys(session_key(scope, name, "refs"))
                listed, *replaced_refs = await reads.execute()
            async with self._redis.pipeline(transaction=False) as reads:
                for name in listed:
                    reads.exists(session_key(scope, name, "meta"))
                found = await reads.execute()
            alive = {name for name, exists in zip(listed, found, strict=True) if exists}
            if len(alive | set(kept)) > policy.sessions_per_place:
                raise SessionLimit(policy.sessions_per_place)
            async with self._redis.pipeline(transaction=True) as tx:
                for (name, stored), refs_before in zip(kept.items(), replaced_refs, strict=True):
                    generation = f"import.{uuid.uuid4().hex}"
                    meta = session_key(scope, name, "meta")
                    messages = session_key(scope, name, "messages")
                    refs = session_key(scope, name, "refs")
                    order = session_key(scope, name, "refseq")
                    tx.delete(meta, messages, refs, order, session_key(scope, name, "answers"))
                    if refs_before:
                        tx.hdel(index, *refs_before)
                    tx.hset(
                        meta,
                        mapping={
                            "model": settings.model,
                            "mcp": mcp_json(settings),
                            "created": now,
                            "updated": now,
                            "format": STORE_FORMAT,
                            "gen": generation,
                            "epoch": generation,
                            "seq": 0,
                            "bytes": sum(map(stored_bytes, stored)),
                        },
                    )
                    if stored:
                        tx.rpush(messages, *stored)
                    tx.zadd(names, {name: now})
                    if policy.ttl_seconds:
                        tx.expire(meta, policy.ttl_seconds)
                        tx.expire(messages, policy.ttl_seconds)
                if kept:
                    state = scope_key(scope, "state")
                    tx.hsetnx(state, "current", next(iter(kept)))
                    if policy.ttl_seconds:
                        for key in (state, names, index):
                            tx.expire(key, policy.ttl_seconds)
                await tx.execute()
        return {name: len(stored) for name, stored in fitted.items()}

    async def read_summary(self, scope: str, name: str) -> Summary | None:
        try:
            async with self._available():
                found = await self._redis.hmget(
                    session_key(scope, stored_name(name), "meta"),
                    ["summary", "summary_upto", "summary_covered"],
                )
        except ResponseError:  # a meta key of the wrong type: no summary to show
            return None
        text, upto, covered = (None if v is None else str(v) for v in found)
        return _summary_of(text, upto, covered)

    async def begin_summary(
        self, scope: str, name: str, token: str, lease_ms: int, keep: int, limit: int
    ) -> SummarySource | None:
        args: list[ScriptArg] = [self._prefix(scope), stored_name(name), token, lease_ms]
        args += [keep, limit]
        async with self._available():
            reply = await self._begin_summary(keys=self._keys(scope), args=args)
        if not reply:
            return None
        if reply == ["busy"]:
            raise SummaryInProgress()
        epoch, text, upto, covered, first, wanted = reply[:6]
        try:
            messages = decode_message_array(name, "[" + ",".join(reply[6:]) + "]")
        except CorruptSession:
            await self.release_summary(scope, name, token)
            raise
        count = int(wanted)
        following = messages[count] if len(messages) > count else None
        return SummarySource(
            name,
            epoch,
            _summary_of(text, upto, covered),
            messages[:count],
            list(range(int(first), int(first) + count)),
            None if following is None else str(following.get("role")),
        )

    async def save_summary(
        self, scope: str, token: str, source: SummarySource, summary: Summary
    ) -> bool:
        before = "" if source.summary is None else str(source.summary.upto)
        args: list[ScriptArg] = [self._prefix(scope), stored_name(source.name), token]
        args += [source.epoch, before]
        args += [summary.text, summary.upto, summary.covered]
        async with self._available():
            return bool(await self._save_summary(keys=self._keys(scope), args=args))

    async def release_summary(self, scope: str, name: str, token: str) -> None:
        async with self._available():
            await self._release_summary(
                keys=self._keys(scope), args=[self._prefix(scope), stored_name(name), token]
            )
