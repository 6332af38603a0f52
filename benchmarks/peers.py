"""Our two stores against their peers, on one workload, in one run: the OpenAI Agents SDK's
`RedisSession` (without and with a TTL) and `SQLiteSession` (on a file), a hand-written
redis-py list (the floor: no lock, no claim, no queue) and the reference's JSON file.

A turn is what a bot does around the model: load the session's history, then save the user's
message and the answer. Ours take their turns through the real engine (`EngineTurns`, as in
the per-turn table), so a turn of ours also claims the message, queues and locks the session,
and builds the context; a peer's turn is `get_items` then `add_items` of the two messages.

Every candidate holds the same stored sessions, all of the same history, and the candidates
take turns one after another on the same session (round-robin, starting with a different
candidate each time), so a slow spell of a shared machine hits them alike:
- *first turns* go to sessions nobody has touched in this process (random ones, a fresh
  SDK session object each): nothing cached, as after a restart;
- *steady state* are later turns in sessions the process served just before.

The SDK comes from the optional `bench` extra (`pip install -e '.[bench]'`), never from the
bot's dependencies; without it only the rows that need it are left out."""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis

from benchmarks import reference_json
from benchmarks.common import (
    POLICY,
    Conversation,
    EngineTurns,
    flush,
    percentile,
    seed,
)
from benchmarks.roundtrips import CountingProxy
from bot.store.base import Message
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore

Progress = Callable[[str], None]

BENCH_EXTRA = "pip install -e '.[bench]'"
OURS_REDIS = "ours: Redis store"
OURS_SQLITE = "ours: SQLite store"
LIST = "redis-py list (LRANGE; MULTI RPUSH EXPIRE)"
SDK_REDIS = "Agents SDK RedisSession"
SDK_REDIS_TTL = "Agents SDK RedisSession with TTL"
SDK_SQLITE = "Agents SDK SQLiteSession (file)"
JSON_FILE = "reference JSON file"
SDK_ROWS = (SDK_REDIS, SDK_REDIS_TTL, SDK_SQLITE)
TTL_SECONDS = 30 * 24 * 3600
"""The TTL of the list and of `RedisSession` with a TTL: refreshed by every save."""


@dataclass(frozen=True)
class Workload:
    sessions: int
    """Stored sessions, every one of `history` messages."""
    history: int


@dataclass(frozen=True)
class PeerPlan:
    workloads: tuple[Workload, ...]
    first_turns: int
    """First turns per candidate and workload (one per untouched session)."""
    steady_sessions: int
    """Sessions (of those given a first turn) that then take `rounds` more turns each."""
    rounds: int
    warmup: int = 3
    trips_turns: int = 5
    """Turns counted through the proxy per Redis candidate, first and steady each."""
    json_turns: int = 5
    json_seconds: float = 8.0


@dataclass
class PeerCell:
    candidate: str
    kind: str
    """The store of ours it is compared with: "redis" or "sqlite"."""
    sessions: int
    history: int
    first: list[int] = field(default_factory=list)
    steady: list[int] = field(default_factory=list)
    store_first: list[int] = field(default_factory=list)
    """Ours: the store's own calls (`begin_turn` + `finish_turn`) within each turn."""
    store_steady: list[int] = field(default_factory=list)
    grown_to: int = 0
    trips_first: float = float("nan")
    """Redis round trips per turn, counted by a proxy."""
    trips_steady: float = float("nan")
    file_bytes: int = 0

    @property
    def ours(self) -> bool:
        return self.candidate in (OURS_REDIS, OURS_SQLITE)

    def p(self, q: float, *, first: bool, store: bool = False) -> float:
        """Percentile `q` in milliseconds."""
        if store:
            values = self.store_first if first else self.store_steady
        else:
            values = self.first if first else self.steady
        return percentile(values, q) / 1e6


@dataclass
class PeerResults:
    plan: PeerPlan
    cells: list[PeerCell] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    """Rows not measured, because the `bench` extra is not installed."""
    why_left_out: str = ""
    load: tuple[float, float] = (float("nan"), float("nan"))
    """The 1-minute load average when the peers' turns began and ended."""


class Candidate(Protocol):
    name: str
    kind: str

    async def seed(self, stored: Sequence[tuple[str, list[Message]]]) -> None: ...

    async def turn(self, scope: str) -> tuple[int, int]:
        """One turn; (whole turn, store calls) in nanoseconds."""
        ...

    def done_with(self, scope: str) -> None:
        """The session takes no more turns here: drop what was kept for it."""
        ...

    async def close(self) -> None: ...


class Ours:
    """Our store through the engine, as the per-turn table measures it."""

    def __init__(self, name: str, kind: str, store: Any, conversation: Conversation) -> None:
        self.name, self.kind = name, kind
        self.store = store
        self.turns = EngineTurns(store, conversation)

    async def seed(self, stored: Sequence[tuple[str, list[Message]]]) -> None:
        await seed(self.store, stored)

    async def turn(self, scope: str) -> tuple[int, int]:
        took = await self.turns.turn(scope)
        return took.total, took.load + took.save

    def done_with(self, scope: str) -> None:
        pass

    async def close(self) -> None:
        await self.store.close()


class _Items:
    """The two messages a peer's turn saves: the same sizes as ours."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.made = 0

    def next(self) -> list[Any]:
        user = self.conversation.user(self.made)
        self.made += 1
        return [user, dict(self.conversation.answer)]


class RedisList:
    """The floor: one list per session, read whole, appended to in one transaction."""

    name, kind = LIST, "redis"

    def __init__(self, url: str, conversation: Conversation) -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=True)
        self.items = _Items(conversation)

    @staticmethod
    def key(scope: str) -> str:
        return f"list:{scope}"

    async def seed(self, stored: Sequence[tuple[str, list[Message]]]) -> None:
        for i in range(0, len(stored), 50):
            async with self.client.pipeline(transaction=False) as pipe:
                for scope, history in stored[i : i + 50]:
                    pipe.rpush(self.key(scope), *(json.dumps(m) for m in history))
                await pipe.execute()

    async def turn(self, scope: str) -> tuple[int, int]:
        added = self.items.next()
        key = self.key(scope)
        start = time.perf_counter_ns()
        history = [json.loads(m) for m in await self.client.lrange(key, 0, -1)]
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(json.dumps(m) for m in added))
            pipe.expire(key, TTL_SECONDS)
            await pipe.execute()
        elapsed = time.perf_counter_ns() - start
        del history
        return elapsed, elapsed

    def done_with(self, scope: str) -> None:
        pass

    async def close(self) -> None:
        await self.client.aclose()


class _SdkSessions:
    """What the SDK's two session kinds share: one object per session, made on its first
    turn in the process and kept while it takes turns; a turn is `get_items` then
    `add_items`, as the SDK's runner does."""

    sessions: dict[str, Any]
    items: _Items

    def _new(self, scope: str) -> Any:
        raise NotImplementedError

    async def turn(self, scope: str) -> tuple[int, int]:
        added = self.items.next()
        start = time.perf_counter_ns()
        session = self.sessions.get(scope)
        if session is None:
            session = self.sessions[scope] = self._new(scope)
        history = await session.get_items()
        await session.add_items(added)
        elapsed = time.perf_counter_ns() - start
        del history
        return elapsed, elapsed


class SdkRedis(_SdkSessions):
    """`RedisSession`, one object per session over one client (as `from_url` builds it),
    kept while the session takes turns."""

    kind = "redis"

    def __init__(self, url: str, conversation: Conversation, ttl: int | None) -> None:
        from agents.extensions.memory.redis_session import RedisSession

        self.name = SDK_REDIS_TTL if ttl else SDK_REDIS
        self.make = RedisSession
        self.ttl = ttl
        self.client = aioredis.Redis.from_url(url)
        self.sessions: dict[str, Any] = {}
        self.items = _Items(conversation)

    def _new(self, scope: str) -> Any:
        return self.make(scope, redis_client=self.client, ttl=self.ttl)

    async def seed(self, stored: Sequence[tuple[str, list[Message]]]) -> None:
        for i in range(0, len(stored), 50):
            batch = stored[i : i + 50]
            await asyncio.gather(*(self._new(s).add_items(list(h)) for s, h in batch))

    def done_with(self, scope: str) -> None:
        self.sessions.pop(scope, None)

    async def close(self) -> None:
        await self.client.aclose()


class SdkSqlite(_SdkSessions):
    """`SQLiteSession` on a file: one object per session, kept while it takes turns (a new
    one opens its connections and checks the schema, as the SDK does)."""

    name, kind = SDK_SQLITE, "sqlite"

    def __init__(self, path: Path, conversation: Conversation) -> None:
        from agents.memory.sqlite_session import SQLiteSession

        self.make = SQLiteSession
        self.path = path
        self.sessions: dict[str, Any] = {}
        self.items = _Items(conversation)

    def _new(self, scope: str) -> Any:
        return self.make(scope, self.path)

    async def seed(self, stored: Sequence[tuple[str, list[Message]]]) -> None:
        # One object writes every session (its public `session_id` switched): the same rows
        # as one object per session, without opening two connections for each.
        writer = self.make("seed", self.path)
        try:
            for scope, history in stored:
                writer.session_id = scope
                items: list[Any] = list(history)
                await writer.add_items(items)
        finally:
            writer.close()

    def done_with(self, scope: str) -> None:
        session = self.sessions.pop(scope, None)
        if session is not None:
            session.close()

    async def close(self) -> None:
        for scope in list(self.sessions):
            self.done_with(scope)


def sdk_missing() -> str:
    """Why the SDK's rows cannot be measured here ("" when they can)."""
    try:
        import agents.extensions.memory.redis_session
        import agents.memory.sqlite_session  # noqa: F401
    except ImportError as error:
        return f"the OpenAI Agents SDK is not installed ({error})"
    return ""


def _database(url: str, index: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{index}"


def _candidates(
    url: str, directory: Path, conversation: Conversation, with_sdk: bool
) -> list[Candidate]:
    """Each Redis candidate in a database of its own on the same server; each SQLite one
    in a file of its own in the same directory."""
    out: list[Candidate] = [
        Ours(OURS_REDIS, "redis", RedisStore.from_url(_database(url, 1), POLICY), conversation),
        Ours(
            OURS_SQLITE,
            "sqlite",
            SqliteStore(directory / "ours.sqlite3", POLICY),
            conversation,
        ),
        RedisList(_database(url, 2), conversation),
    ]
    if with_sdk:
        out += [
            SdkRedis(_database(url, 3), conversation, None),
            SdkRedis(_database(url, 4), conversation, TTL_SECONDS),
            SdkSqlite(directory / "sdk.sqlite3", conversation),
        ]
    return out


def _trip_candidate(name: str, url: str, conversation: Conversation) -> Candidate:
    """A second instance of Redis candidate `name` (same database) talking through `url`."""
    index = {OURS_REDIS: 1, LIST: 2, SDK_REDIS: 3, SDK_REDIS_TTL: 4}[name]
    target = _database(url, index)
    if name == OURS_REDIS:
        return Ours(name, "redis", RedisStore.from_url(target, POLICY), conversation)
    if name == LIST:
        return RedisList(target, conversation)
    return SdkRedis(target, conversation, TTL_SECONDS if name == SDK_REDIS_TTL else None)


async def measure(
    url: str, port: int, plan: PeerPlan, conversation: Conversation, progress: Progress
) -> PeerResults:
    missing = sdk_missing()
    results = PeerResults(plan)
    if missing:
        results.left_out = list(SDK_ROWS)
        results.why_left_out = missing
        progress(f"peers: {missing}; leaving out {', '.join(SDK_ROWS)}")
    start = os.getloadavg()[0]
    for workload in plan.workloads:
        results.cells += await _workload(url, port, plan, workload, conversation, progress, missing)
    results.load = (start, os.getloadavg()[0])
    return results


async def _workload(
    url: str,
    port: int,
    plan: PeerPlan,
    workload: Workload,
    conversation: Conversation,
    progress: Progress,
    missing: str,
) -> list[PeerCell]:
    n, h = workload.sessions, workload.history
    scopes = [f"discord:{700_000 + i}" for i in range(n)]
    order = random.Random(n * 1000 + h).sample(scopes, len(scopes))
    warm = order[: plan.warmup]
    firsts = order[plan.warmup : plan.warmup + plan.first_turns]
    spare = order[plan.warmup + plan.first_turns :][: plan.trips_turns]
    steady = firsts[: plan.steady_sessions]
    await flush(url)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as directory:
        candidates = _candidates(url, Path(directory), conversation, not missing)
        cells = {c.name: PeerCell(c.name, c.kind, n, h) for c in candidates}
        try:
            history = conversation.history(h)
            for candidate in candidates:
                progress(f"peers, {n} sessions of {h} messages: seeding {candidate.name}")
                await candidate.seed([(s, history) for s in scopes])

            keep = set(steady)

            async def each(scope: str, index: int, record: bool, first: bool) -> None:
                start = index % len(candidates)
                for candidate in candidates[start:] + candidates[:start]:
                    total, store = await candidate.turn(scope)
                    if scope not in keep:  # no more turns: close what it opened
                        candidate.done_with(scope)
                    if record:
                        cell = cells[candidate.name]
                        (cell.first if first else cell.steady).append(total)
                        (cell.store_first if first else cell.store_steady).append(store)

            for i, scope in enumerate(warm):  # connections, scripts, threads
                await each(scope, i, False, True)
            progress(f"peers: {len(firsts)} first turns each")
            for i, scope in enumerate(firsts):
                await each(scope, i, True, True)
            progress(f"peers: {plan.rounds} rounds of {len(steady)} sessions each")
            turn = 0
            for _ in range(plan.rounds):
                for scope in steady:
                    await each(scope, turn, True, False)
                    turn += 1
            for cell in cells.values():  # before the last turn of a steady session
                cell.grown_to = h + 2 * plan.rounds
        finally:
            for candidate in candidates:
                await candidate.close()
        if spare:
            await _round_trips(url, port, candidates, spare, cells, conversation)
    out = list(cells.values())
    out.append(await _json(plan, workload, conversation))
    for cell in out:
        progress(
            f"peers, {n} x {h}: {cell.candidate}: first p50 {cell.p(50, first=True):.3f} ms, "
            f"steady p50 {cell.p(50, first=False):.3f} ms"
        )
    return out


async def _round_trips(
    url: str,
    port: int,
    candidates: Sequence[Candidate],
    spare: Sequence[str],
    cells: dict[str, PeerCell],
    conversation: Conversation,
) -> None:
    """Round trips per turn of each Redis candidate: a first turn, then a second one, in
    each of the `spare` sessions (untouched so far), through a counting proxy."""
    for candidate in candidates:
        if candidate.kind != "redis":
            continue
        proxy = await CountingProxy(port).start()
        counted = _trip_candidate(candidate.name, proxy.url, conversation)
        try:
            await counted.turn(spare[0])  # connection open, scripts loaded
            counts: list[float] = []
            for _ in range(2):
                proxy.reset()
                for scope in spare[1:]:
                    await counted.turn(scope)
                counts.append(proxy.round_trips / max(1, len(spare) - 1))
            cells[candidate.name].trips_first, cells[candidate.name].trips_steady = counts
        finally:
            await counted.close()
            await proxy.close()


async def _json(plan: PeerPlan, workload: Workload, conversation: Conversation) -> PeerCell:
    """The reference's file on its own (a turn takes up to seconds, so a few turns, not
    interleaved): it keeps nothing between turns, so every turn is a first turn."""
    n, h = workload.sessions, workload.history
    cell = PeerCell(JSON_FILE, "sqlite", n, h, grown_to=h)
    with tempfile.TemporaryDirectory(prefix="bench-peers-json-") as directory:
        scopes = [f"discord:{700_000 + i}" for i in range(n)]
        result = await reference_json.measure(
            Path(directory) / "sessions.json",
            conversation,
            [(s, h) for s in scopes],
            scopes[: plan.steady_sessions],
            plan.json_turns,
            plan.json_seconds,
        )
    cell.first = cell.steady = list(result.phases.total)
    cell.store_first = cell.store_steady = list(result.phases.total)
    cell.file_bytes = result.file_bytes
    return cell
