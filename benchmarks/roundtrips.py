"""Redis commands and network round trips per turn, counted rather than estimated.

A small TCP proxy sits between the bot's Redis client and redis-server. It parses the
commands the client sends (RESP arrays) and counts round trips: a round trip starts when the
client sends after having received something (or for the first time), so commands pipelined
in one burst count once. Redis's own `INFO commandstats` (reset before the turns) adds what
ran inside Redis: a Lua script is one FCALL (or EVALSHA) on the wire, while the commands it
calls with `redis.call` are counted separately there, with the server time they took."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import redis.asyncio as aioredis

import bot.store.redis as redis_store
import bot.store.redis_usage as redis_usage
from benchmarks.common import POLICY, Conversation, EngineTurns, percentile, run_turns, seed
from bot.store.redis import RedisStore


class _Requests:
    """Incremental parser of the client's side of RESP: arrays of bulk strings."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        names: list[str] = []
        while (name := self._next()) is not None:
            names.append(name)
        return names

    def _next(self) -> str | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if end < 0:
            return None
        if buffer[:1] != b"*":  # an inline command (redis-cli style): one line
            del buffer[: end + 2]
            return bytes(buffer[:end]).split(b" ", 1)[0].decode().upper()
        count, pos, name = int(buffer[1:end]), end + 2, ""
        for i in range(count):
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                return None
            start = end + 2
            stop = start + int(buffer[pos + 1 : end])
            if stop + 2 > len(buffer):
                return None
            if i == 0:
                name = bytes(buffer[start:stop]).decode().upper()
            pos = stop + 2
        del buffer[:pos]
        return name


@dataclass
class CountingProxy:
    """Forwards 127.0.0.1:`port` to the Redis server at `target_port`, counting."""

    target_port: int
    port: int = 0
    round_trips: int = 0
    commands: Counter[str] = field(default_factory=Counter)
    _server: asyncio.Server | None = None
    _pumps: set[asyncio.Task[None]] = field(default_factory=set)
    _handlers: set[asyncio.Task[object]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def reset(self) -> None:
        self.round_trips = 0
        self.commands.clear()

    async def close(self) -> None:
        """Stop listening and end every open link (each connection's handler then returns)."""
        if self._server is not None:
            self._server.close()
            for task in list(self._pumps):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        waiting = [False]  # the client has sent and not yet heard back
        requests = _Requests()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if not waiting[0]:
                    self.round_trips += 1
                    waiting[0] = True
                self.commands.update(requests.feed(data))
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                waiting[0] = False
                client_w.write(data)
                await client_w.drain()

        pumps = {asyncio.create_task(upstream()), asyncio.create_task(downstream())}
        self._pumps |= pumps
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps -= pumps
            client_w.close()
            server_w.close()
            self._handlers.discard(handler)


def script_names(store: RedisStore) -> dict[str, str]:
    """How each of `store`'s scripts shows in SLOWLOG (its SHA1 for EVALSHA, its function's
    name for FCALL) -> its name in bot/store/redis.py or bot/store/redis_usage.py."""
    named = {
        redis_store._single_redis(value): name.strip("_").lower()
        for module in (redis_store, redis_usage)
        for name, value in vars(module).items()
        if isinstance(value, str) and "redis.call" in value
    }
    out: dict[str, str] = {}
    for holder in (store, store._usage):
        for script in vars(holder).values():
            if isinstance(script, redis_store._Script):
                for wire in script.wire_names():
                    out[wire] = named.get(script.source, wire[:8])
    return out


def script_times(entries: list[dict[str, object]], store: RedisStore) -> dict[str, float]:
    """Median duration (µs) of each of `store`'s scripts in SLOWLOG entries, by name."""
    names = script_names(store)
    durations: defaultdict[str, list[int]] = defaultdict(list)
    for entry in entries:
        raw = entry["command"]
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        words = text.split(" ", 2)
        if words[0].upper() in ("EVALSHA", "FCALL") and len(words) > 1:
            durations[names.get(words[1], words[1][:8])].append(int(str(entry["duration"])))
    return {name: percentile(values, 50) for name, values in durations.items()}


def parse_commandstats(info: dict[str, dict[str, float]]) -> dict[str, tuple[int, float]]:
    """{command: (calls, usec)} from redis-py's parsed `INFO commandstats`."""
    out: dict[str, tuple[int, float]] = {}
    for key, stats in info.items():
        name = key.removeprefix("cmdstat_").upper()
        if name in ("INFO", "CONFIG|RESETSTAT"):
            continue
        out[name] = (int(stats["calls"]), float(stats["usec"]))
    return out


@dataclass(frozen=True)
class RoundTrips:
    history: int
    turns: int
    round_trips: float
    """Per turn, on the wire."""
    sent: dict[str, float]
    """Commands on the wire per turn, by name."""
    executed: dict[str, float]
    """Commands Redis ran per turn (scripts and the commands inside them), by name."""
    server_usec: float
    """Redis's time in the turn's scripts and commands, per turn."""
    script_usec: dict[str, float]
    """Median server time of each script the turn ran (from SLOWLOG), by script."""

    @property
    def sent_total(self) -> float:
        return sum(self.sent.values())

    @property
    def inside_scripts(self) -> float:
        """Commands run by the scripts (all executed commands but the ones sent)."""
        return sum(self.executed.values()) - sum(self.executed.get(name, 0.0) for name in self.sent)


async def count(
    redis_port: int, conversation: Conversation, history: int, turns: int, sessions: int = 20
) -> RoundTrips:
    """Steady-state counts per turn at `history` messages: scripts are loaded, the
    connection is open and the engine has served each session before counting starts (one
    engine throughout, as in one bot process: it notes a place at most once a minute)."""
    direct = aioredis.Redis(port=redis_port, decode_responses=True)
    proxy = await CountingProxy(redis_port).start()
    store = RedisStore.from_url(proxy.url, POLICY)
    try:
        await direct.flushall()
        scopes = [f"discord:{200_000 + i}" for i in range(sessions)]
        await seed(store, [(s, conversation.history(history)) for s in scopes])
        engine = EngineTurns(store, conversation)
        await run_turns(store, conversation, scopes, rounds=1, turns=engine)  # warms up
        rounds = max(1, turns // sessions)
        await direct.config_set("slowlog-log-slower-than", 0)  # every command, with its time
        await direct.config_set("slowlog-max-len", 4 * turns + 100)
        await direct.slowlog_reset()
        await direct.config_resetstat()
        proxy.reset()
        await run_turns(store, conversation, scopes, rounds, turns=engine)
        stats = parse_commandstats(await direct.info("commandstats"))
        scripts = script_times(await direct.slowlog_get(4 * turns + 100), store)
        await direct.config_set("slowlog-log-slower-than", 10_000)
        done = rounds * len(scopes)
        sent = {name: n / done for name, n in proxy.commands.items()}
        executed = {name: calls / done for name, (calls, _) in stats.items()}
        server_usec = sum(usec for name, (_, usec) in stats.items() if name in proxy.commands)
        return RoundTrips(
            history=history,
            turns=done,
            round_trips=proxy.round_trips / done,
            sent=sent,
            executed=executed,
            server_usec=server_usec / done,
            script_usec=scripts,
        )
    finally:
        await store.close()
        await proxy.close()
        await direct.aclose()
