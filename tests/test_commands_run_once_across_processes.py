"""Discord delivers every slash command and autocomplete request to every process connected
with the bot's token. With two processes on one Redis, whichever is first acts on each one,
once; the other stays silent (no second session, no second answer, nothing in its log)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from bot.discord_bot.scopes import scope_for
from bot.store.base import StorePolicy
from bot.store.redis import RedisStore, session_key
from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.conftest import TEST_MODELS
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord
from tests.fakes.discord_interactions import AUTOCOMPLETE


class TwoBots:
    def __init__(
        self, fake: FakeDiscord, logs: list[Path], store: RedisStore, api: FakeDedalusAPI
    ) -> None:
        self.fake, self.logs, self.store, self.api = fake, logs, store, api

    def log_text(self) -> str:
        return "".join(log.read_text() for log in self.logs)

    async def both_tried(self, interaction: int) -> None:
        """Until both processes tried to acknowledge `interaction` (Discord accepts one)."""
        fake = self.fake

        def tried() -> bool:
            return sum(f"/interactions/{interaction}/" in r.path for r in fake.requests) >= 2

        await fake.wait_for(tried, 30, what=f"two answers to interaction {interaction}")
        statuses = [r.status for r in fake.requests if f"/interactions/{interaction}/" in r.path]
        assert sorted(statuses) == [200, 400]  # the second: 40060, already acknowledged

    async def one_gave_up(self, interaction: int) -> None:
        """Until the process Discord refused said so, and did nothing else."""
        given_up = f"interaction {interaction} answered elsewhere"
        await self.fake.wait_for(
            lambda: self.log_text().count(given_up) == 1, 30, what=f"{given_up!r} in one log"
        )


@pytest.fixture
async def two_bots(redis_url: str, tmp_path: Path) -> AsyncIterator[TwoBots]:
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
    with FakeDiscord(rate_limit=1000) as fake, FakeDedalusAPI() as api:
        env = bot_environment(fake, api, redis_url, LOG_LEVEL="DEBUG")
        logs = [tmp_path / f"bot{i}.log" for i in range(2)]
        bots = [BotProcess(env, log) for log in logs]
        try:
            wait_connected(bots)
            assert fake.connected_sessions == 2
            yield TwoBots(fake, logs, store, api)
        finally:
            for bot in bots:
                bot.stop()
    await store.close()


async def test_each_command_and_autocomplete_is_acted_on_once(two_bots: TwoBots) -> None:
    fake, store = two_bots.fake, two_bots.store
    scope = scope_for(fake.general_id)

    new = fake.invoke("new", user=fake.member, channel_id=fake.general_id)
    reply = await fake.wait_interaction_reply(new, timeout=30)
    await two_bots.both_tried(new)
    assert sorted(s.name for s in await store.list_sessions(scope)) == ["chat-1"]
    await two_bots.one_gave_up(new)
    assert reply.response_types == [5] and not reply.ephemeral
    assert [m.content for m in fake.interaction_reply(new).messages] == [
        "Started new session: chat-1"
    ]

    add = fake.invoke(
        "mcp",
        {"server": "acme/search"},
        user=fake.admin,
        channel_id=fake.general_id,
        subcommand="add",
    )
    await fake.wait_interaction_reply(add, timeout=30)
    await two_bots.both_tried(add)
    assert (await store.current_session(scope)).settings.mcp_servers == ("acme/search",)
    await two_bots.one_gave_up(add)
    assert [m.content for m in fake.interaction_reply(add).messages] == [
        "Added MCP server: acme/search"
    ]

    choices = await fake.autocomplete(
        "load", "name", "chat", fake.member, fake.general_id, timeout=30
    )
    assert [c["value"] for c in choices] == ["chat-1"]
    [completion] = [
        int(d["id"])
        for e, d in fake.dispatched
        if e == "INTERACTION_CREATE" and d["type"] == AUTOCOMPLETE
    ]
    given_up = f"autocomplete {completion} answered elsewhere"
    await fake.wait_for(lambda: given_up in two_bots.log_text(), 30, what=given_up)
    answers = [r for r in fake.requests if f"/interactions/{completion}/" in r.path]
    assert [r.status for r in answers] == [200]  # the other process never tried

    logged = two_bots.log_text()
    assert "Traceback" not in logged and not re.search(r"\bERROR\b", logged), logged


async def test_retry_and_undo_act_once(two_bots: TwoBots, redis_url: str) -> None:
    """The question is answered by one process; /retry then /undo each run in one process
    (whichever Discord accepts): the model is asked once more, the answer edited once, the
    exchange taken back once."""
    fake, store, api = two_bots.fake, two_bots.store, two_bots.api
    scope = scope_for(fake.general_id)
    asked = fake.user_says(fake.general_id, fake.member, "what is a monad?", mentions_bot=True)
    [answer] = await fake.wait_bot_messages(fake.general_id, timeout=30)
    assert answer.reply_to == asked
    records = session_key(scope, "default", "answers")
    with redis.Redis.from_url(redis_url) as client:
        await fake.wait_for(  # the answering process noted where its answer went
            lambda: client.hexists(records, str(asked)), 30, what="the answer's record"
        )

    api.reply_text("A better answer.")
    retry = fake.invoke("retry", user=fake.member, channel_id=fake.general_id)
    reply = await fake.wait_interaction_reply(retry, timeout=30)
    await two_bots.both_tried(retry)
    await two_bots.one_gave_up(retry)
    assert reply.text == "Answered “what is a monad?” again." and reply.ephemeral
    [edited] = [m for m in fake.bot_messages(fake.general_id) if m.interaction_id is None]
    assert edited.id == answer.id and edited.content == "A better answer."
    assert api.request_count == 2  # the question, then the retry: once

    undo = fake.invoke("undo", user=fake.member, channel_id=fake.general_id)
    reply = await fake.wait_interaction_reply(undo, timeout=30)
    await two_bots.both_tried(undo)
    await two_bots.one_gave_up(undo)
    assert reply.text.startswith("Undone: “what is a monad?”")
    assert await store.read_history(scope, "default") == []

    logged = two_bots.log_text()
    assert "Traceback" not in logged and not re.search(r"\bERROR\b", logged), logged
