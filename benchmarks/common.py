"""Shared pieces: the synthetic conversation, the instant model, per-phase timing, seeding,
statistics and a throwaway redis-server."""

from __future__ import annotations

import asyncio
import math
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis

import bot.engine as engine_module
from bot.config import DEFAULT_SYSTEM_PROMPT, REFERENCE_MODELS
from bot.engine import Engine, EngineLimits
from bot.model import TextSink
from bot.store.base import Message, SessionSettings, SessionStore, StorePolicy, message_size
from bot.usage import UsageMeter
from tests.conftest import RedisServer

BUDGET_BYTES = 16_000 * 4
"""The default CONTEXT_BUDGET_TOKENS (16,000) in stored bytes, as the composition root does."""
MODEL = REFERENCE_MODELS[0]
SETTINGS = SessionSettings(model=MODEL)
POLICY = StorePolicy(default_model=MODEL)  # production defaults: no TTL, cap 2,000 messages
LIMITS = EngineLimits(
    system_prompt=DEFAULT_SYSTEM_PROMPT, budget_bytes=BUDGET_BYTES, summaries=False
)
"""Summaries off: these benchmarks time the turn itself; a summary is written once per
stretch of history, in the background (`benchmarks.tokens` shows what it does)."""
USER_BYTES = 200
ASSISTANT_BYTES = 600
"""Stored sizes of the synthetic messages: a Discord line with its speaker tag, and an answer
of a few sentences. With the default budget about 160 of them fit in a model call."""

_WORDS = (  # noqa: SIM905 - a sentence is easier to read than a list of 37 strings
    "the bot channel thread message answer model redis session history context budget "
    "server discord python latency turn store lock queue token reply stream fast small "
    "large question because which would could should about there their every other"
).split()


def _text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length <= size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def _message(role: str, prefix: str, rng: random.Random, size: int) -> Message:
    """A message of exactly `size` stored bytes (ASCII text, so characters are bytes)."""
    room = size - message_size({"role": role, "content": ""})
    return {"role": role, "content": (prefix + _text(rng, room))[:room]}


class Conversation:
    """Deterministic user and assistant messages of fixed stored sizes."""

    def __init__(self, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.users: list[Message] = []
        self.answers: list[Message] = []
        for i in range(64):
            speaker = f"[Member {i % 7} (user id {1_100_000_000_000_000_000 + i % 7})]: "
            self.users.append(_message("user", speaker, rng, USER_BYTES))
            self.answers.append(_message("assistant", "", rng, ASSISTANT_BYTES))

    def history(self, length: int, offset: int = 0) -> list[Message]:
        """`length` messages, alternating user and assistant, starting with a user message."""
        out: list[Message] = []
        for i in range(length):
            pool = self.users if i % 2 == 0 else self.answers
            out.append(pool[(offset + i // 2) % len(pool)])
        return out

    def user(self, turn: int) -> Message:
        return dict(self.users[turn % len(self.users)])

    @property
    def answer(self) -> Message:
        return self.answers[0]


def mean_stored_bytes(conversation: Conversation) -> float:
    sizes = [message_size(m) for m in conversation.history(128)]
    return sum(sizes) / len(sizes)


class InstantModel:
    """A `ModelClient` that answers at once, in-process: no network, no tokens."""

    def __init__(self, answer: Message) -> None:
        self.answer = answer
        self.model_ns = 0
        self.sent_messages = 0

    async def complete(
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        meter: UsageMeter | None = None,
    ) -> list[Message]:
        start = time.perf_counter_ns()
        self.sent_messages = len(messages)
        added = [dict(self.answer)]
        self.model_ns += time.perf_counter_ns() - start
        return added

    async def stream(
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        on_text: TextSink,
        meter: UsageMeter | None = None,
    ) -> str:
        self.sent_messages = len(messages)
        text = str(self.answer["content"])
        await on_text(text)
        return text


class TimedStore:
    """Wraps a store and times the turn's two store calls; everything else passes through.
    Arguments are passed on untouched, so it follows changes to their signatures."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.load_ns = 0
        self.save_ns = 0

    async def begin_turn(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return await self.inner.begin_turn(*args, **kwargs)
        finally:
            self.load_ns += time.perf_counter_ns() - start

    async def finish_turn(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return await self.inner.finish_turn(*args, **kwargs)
        finally:
            self.save_ns += time.perf_counter_ns() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Phases:
    """Per-turn nanoseconds of each part of a turn (the model's own time excluded)."""

    total: list[int] = field(default_factory=list)
    load: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    save: list[int] = field(default_factory=list)
    sent_messages: list[int] = field(default_factory=list)


@contextmanager
def timed_build_context() -> Iterator[list[int]]:
    """Time the engine's calls of `build_context` (patched on the engine module for the
    duration; the list collects one entry per call)."""
    original = getattr(engine_module, "build_context", None)
    calls: list[int] = []
    if original is None:  # the engine changed: report context time as part of the rest
        yield calls
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            calls.append(time.perf_counter_ns() - start)

    engine_module.build_context = timed  # type: ignore[attr-defined]
    try:
        yield calls
    finally:
        engine_module.build_context = original  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TurnTime:
    """One turn's nanoseconds by part (the model's own time excluded)."""

    total: int
    load: int
    context: int
    save: int
    sent_messages: int


class EngineTurns:
    """One engine over a timed store, taking turns one at a time as the Discord glue does:
    each turn a Discord message, claimed, ordered, and remembered for deletion. The engine
    lives as long as this object, as it does in the bot (what it notes once per place is
    noted once)."""

    def __init__(self, store: SessionStore, conversation: Conversation) -> None:
        self.timed = TimedStore(store)
        self.model = InstantModel(conversation.answer)
        self.engine = Engine(cast(SessionStore, self.timed), self.model, LIMITS)
        self.conversation = conversation
        self.made = 0

    async def turn(self, scope: str, context_calls: list[int] | None = None) -> TurnTime:
        """`context_calls`: the list `timed_build_context` fills, if it is in effect."""
        timed, model = self.timed, self.model
        timed.load_ns = timed.save_ns = model.model_ns = 0
        if context_calls is not None:
            context_calls.clear()
        user = self.conversation.user(self.made)
        self.made += 1
        message_id = time.time_ns()  # grows like a Discord message id
        start = time.perf_counter_ns()
        await self.engine.reply(  # as the Discord glue calls it
            scope,
            user,
            user_ref=str(message_id),
            order=message_id,
            claim=str(message_id),
        )
        elapsed = time.perf_counter_ns() - start
        return TurnTime(
            total=elapsed - model.model_ns,
            load=timed.load_ns,
            context=sum(context_calls or ()),
            save=timed.save_ns,
            sent_messages=model.sent_messages,
        )


async def run_turns(
    store: SessionStore,
    conversation: Conversation,
    scopes: Sequence[str],
    rounds: int,
    warmup: int = 0,
    *,
    first: Phases | None = None,
    turns: EngineTurns | None = None,
) -> Phases:
    """`rounds` rounds of one turn in each scope, one turn at a time, through the real
    engine with the instant model (`EngineTurns`); the first `warmup` turns are not
    recorded. With `first`, the first round is recorded there instead (and is not warm-up):
    each scope's first turn since its session was stored, which finds nothing of it cached.
    `turns`: the engine of earlier calls, to go on in the same process (else a new one)."""
    turns = turns or EngineTurns(store, conversation)
    phases = Phases()
    turn = 0
    with timed_build_context() as context_calls:
        for round_index in range(rounds):
            into = first if round_index == 0 and first is not None else phases
            for scope in scopes:
                took = await turns.turn(scope, context_calls)
                if into is phases:
                    turn += 1
                    if turn <= warmup:
                        continue
                into.total.append(took.total)
                into.load.append(took.load)
                into.context.append(took.context)
                into.save.append(took.save)
                into.sent_messages.append(took.sent_messages)
    return phases


async def seed(
    store: SessionStore, sessions: Sequence[tuple[str, list[Message]]], batch: int = 50
) -> None:
    """Store each (scope, history) as that scope's `default` session, `batch` at a time
    (the store's `import_sessions`, as `python -m bot import` does)."""
    for i in range(0, len(sessions), batch):
        await asyncio.gather(
            *(
                store.import_sessions(scope, {"default": history}, SETTINGS)
                for scope, history in sessions[i : i + batch]
            )
        )


def background_lengths(count: int, seed: int = 7) -> list[int]:
    """History lengths of the sessions that are stored but not measured: 10 to 100."""
    rng = random.Random(seed)
    return [rng.randint(10, 100) for _ in range(count)]


def percentile(values: Sequence[int | float], q: float) -> float:
    """Nearest-rank percentile (the max when there are fewer than 100/(100-q) samples)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


async def flush(url: str) -> None:
    """Empty the benchmark's Redis server (every database)."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A throwaway redis-server on a free port (the tests' helper), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()
