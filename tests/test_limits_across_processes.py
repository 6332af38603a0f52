"""Two bot processes share one store and both see every message: a member's message rate is
still hit at exactly the configured count (each message is checked once, by the process
that holds it), the member is told once, and the limit lifts when the minute has passed
(the test moves the stored times back a minute instead of waiting one)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bot.store.redis import usage_key
from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

PER_MINUTE = 3
REFUSED = "not answered: its author is over a usage limit"
NOTICE = "This message was not sent to the model."


@dataclass
class TwoBots:
    fake: FakeDiscord
    api: FakeDedalusAPI
    logs: list[Path]
    redis_url: str | None
    sqlite_path: Path

    def log_text(self) -> str:
        return "".join(log.read_text() for log in self.logs)

    def answers(self) -> list[str]:
        return [m.content for m in self.fake.bot_messages(self.fake.general_id)]

    async def a_minute_passes(self) -> None:
        """Move every stored time of the member's limits back a minute: what the store holds
        once a minute has passed."""
        server, user = f"guild:{self.fake.guild_id}", str(self.fake.member_id)
        if self.redis_url is None:
            with sqlite3.connect(self.sqlite_path) as db:
                db.execute("UPDATE rate_log SET at = at - 61")
                db.execute("UPDATE limit_notices SET until = until - 61")
            return
        client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
        rate = usage_key(server, f"rate:{user}")
        logged = await client.zrange(rate, 0, -1, withscores=True)
        await client.zadd(rate, {str(entry[0]): float(entry[1]) - 61_000 for entry in logged})
        await client.delete(usage_key(server, f"notice:{user}"))  # it lasts a minute
        await client.aclose()


@pytest.fixture(params=["redis", "sqlite"])
async def two_bots(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> AsyncIterator[TwoBots]:
    sqlite_path = tmp_path / "shared.sqlite3"
    shared = redis_url if request.param == "redis" else None
    with FakeDiscord(rate_limit=1000) as fake, FakeDedalusAPI() as api:
        env = bot_environment(
            fake,
            api,
            shared,
            SQLITE_PATH=str(sqlite_path),
            LOG_LEVEL="DEBUG",
            USER_MESSAGES_PER_MINUTE=str(PER_MINUTE),
        )
        logs = [tmp_path / f"bot{i}.log" for i in range(2)]
        bots = [BotProcess(env, log) for log in logs]
        try:
            wait_connected(bots)
            assert fake.connected_sessions == 2
            yield TwoBots(fake, api, logs, shared, sqlite_path)
        finally:
            for bot in bots:
                bot.stop()


async def test_the_rate_is_hit_at_exactly_its_count_across_processes(two_bots: TwoBots) -> None:
    fake, api = two_bots.fake, two_bots.api
    for i in range(PER_MINUTE + 2):
        fake.user_says(fake.general_id, fake.member, f"message {i}", mentions_bot=True)

    def decided() -> bool:
        answered = [text for text in two_bots.answers() if text.startswith("echo:")]
        refused = two_bots.log_text().count(REFUSED)
        return len(answered) >= PER_MINUTE and refused >= 2

    await fake.wait_for(decided, 60, what="every message answered or refused")
    await fake.wait_for(lambda: api.request_count >= PER_MINUTE, 30, what="the model calls")
    assert api.request_count == PER_MINUTE
    assert sum(NOTICE in text for text in two_bots.answers()) == 1

    await two_bots.a_minute_passes()
    later = fake.user_says(fake.general_id, fake.member, "a minute later", mentions_bot=True)
    await fake.wait_for(
        lambda: any("a minute later" in text for text in two_bots.answers()),
        60,
        what="the answer a minute later",
    )
    # Each process handles a channel's messages in order: once the one that did not answer
    # the last message gave it up, both are done with every earlier one.
    given_up = f"message {later} is answered elsewhere"
    await fake.wait_for(lambda: given_up in two_bots.log_text(), 60, what=given_up)
    assert api.request_count == PER_MINUTE + 1
    assert two_bots.log_text().count(REFUSED) == 2  # each message checked by one process
    assert sum(NOTICE in text for text in two_bots.answers()) == 1
    assert "Traceback" not in two_bots.log_text()
