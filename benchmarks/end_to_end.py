"""Figures with the real clients in the loop, for context (they include HTTP, the SDK and
discord.py, all over loopback, so they are not the bot's own overhead):

- a turn through the real `dedalus_labs` SDK against the fake Dedalus API (tests/fakes),
  which answers at once;
- a message through the fake Discord gateway and REST API to the whole bot
  (tests/discord_harness.py): from the user's message being posted to the bot's reply
  being posted, and to the reply's final text being in place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.common import LIMITS, POLICY, Conversation, percentile, seed
from benchmarks.roundtrips import CountingProxy
from bot.engine import Engine
from bot.model import DedalusModel
from bot.store.redis import RedisStore
from tests.fakes.dedalus_api import FakeDedalusAPI


@dataclass(frozen=True)
class Timing:
    label: str
    samples_ns: list[int]

    @property
    def count(self) -> int:
        return len(self.samples_ns)

    def p(self, q: float) -> float:
        return percentile(self.samples_ns, q) / 1e6


async def sdk_turns(redis_url: str, turns: int, history: int = 100) -> list[Timing]:
    """Engine turns with the real SDK against the instant fake API, non-streamed (the
    console) and streamed (Discord)."""
    conversation = Conversation()
    store = RedisStore.from_url(redis_url, POLICY)
    results: list[Timing] = []
    try:
        with FakeDedalusAPI() as api:
            model = DedalusModel.connect("test-key", api.base_url, timeout=10.0, max_retries=0)
            engine = Engine(store, model, LIMITS)
            scopes = [f"discord:{400_000 + i}" for i in range(10)]
            await seed(store, [(s, conversation.history(history)) for s in scopes])

            async def ignore(_: str) -> None:
                return None

            for label, sink in (("complete", None), ("stream", ignore)):
                samples: list[int] = []
                for turn in range(turns + 5):
                    start = time.perf_counter_ns()
                    await engine.reply(
                        scopes[turn % len(scopes)], conversation.user(turn), on_text=sink
                    )
                    if turn >= 5:
                        samples.append(time.perf_counter_ns() - start)
                results.append(Timing(label, samples))
    finally:
        await store.close()
    return results


SETTLE_SECONDS = 0.05

DISCORD_CALLS = (
    "begin_turn; finish_turn, which also adds the session's tokens, and the server's day"
    " counter (another hash slot), made together and so written in one go on the scripts'"
    " shared connection; note_answer once the answer is posted (where it went, for /retry)"
)
"""The Redis calls one Discord message makes, as the report names them."""


@dataclass(frozen=True)
class DiscordResult:
    posted: Timing
    complete: Timing
    round_trips: float
    """Redis round trips per message on the whole Discord path."""
    commands: dict[str, float]
    """Redis commands per message on the whole Discord path."""


async def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the bot did not answer in time")
        await asyncio.sleep(0.0005)


async def _drive(
    redis_url: str, messages: int, warmup: int, warmed: Callable[[], None] = lambda: None
) -> tuple[list[int], list[int]]:
    """Post `warmup + messages` mentions in one channel, one at a time; per measured message,
    the time until the bot's reply appears and until it holds the final text (the fake
    model echoes the message, so the text ends with what was said). `warmed` runs after the
    warm-up messages."""
    from tests.discord_harness import Harness
    from tests.fakes.discord_gateway import FakeDiscord

    posted: list[int] = []
    complete: list[int] = []
    # Rate limits loosened so that Discord's throttling does not enter the figure.
    with (
        FakeDiscord(rate_limit=100_000) as discord,
        discord.point_discord_py_here(),
        FakeDedalusAPI() as api,
    ):
        harness = Harness(discord, api, redis_url)
        await harness.start()
        try:
            channel = discord.general_id
            for i in range(warmup + messages):
                if i == warmup:
                    warmed()
                said = f"benchmark message {i}"
                before = len(harness.answers(channel))

                def posted_now(before: int = before) -> bool:
                    return len(harness.answers(channel)) > before

                def complete_now(said: str = said) -> bool:
                    return any(a.content.endswith(said) for a in harness.answers(channel))

                start = time.perf_counter_ns()
                discord.user_says(channel, discord.member, said, mentions_bot=True)
                await _wait(posted_now)
                first = time.perf_counter_ns()
                await _wait(complete_now)
                if i >= warmup:
                    posted.append(first - start)
                    complete.append(time.perf_counter_ns() - start)
                # The text can be complete before the turn is saved (an instant model's whole
                # answer is in the first post): let the turn end before the next message.
                await asyncio.sleep(SETTLE_SECONDS)
        finally:
            await harness.stop()
    return posted, complete


async def discord_messages(redis_url: str, redis_port: int, messages: int) -> DiscordResult:
    """Timed over a direct connection to Redis, then counted through the proxy."""
    posted, complete = await _drive(redis_url, messages, warmup=2)
    proxy = await CountingProxy(redis_port).start()
    try:
        counted = max(3, messages // 4)
        await _drive(proxy.url, counted, warmup=1, warmed=proxy.reset)
        round_trips = proxy.round_trips / counted
        commands = {name: n / counted for name, n in proxy.commands.items()}
    finally:
        await proxy.close()
    return DiscordResult(
        Timing("reply posted", posted), Timing("reply complete", complete), round_trips, commands
    )
