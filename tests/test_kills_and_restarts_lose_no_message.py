"""Processes killed, stopped and restarted at any moment: every message addressed to the bot
is answered once. Real processes, real signals, one fake Discord, one store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.discord_bot.scopes import scope_for
from bot.store.base import SessionStore, StorePolicy
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore
from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.conftest import TEST_MODELS
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

LEASE_SECONDS = 3
WAITING = "being answered by another process"
"""What a process that saw a message another one is answering logs (at DEBUG)."""


@pytest.fixture
def fakes() -> Iterator[tuple[FakeDiscord, FakeDedalusAPI]]:
    with FakeDiscord(rate_limit=1000) as discord_fake, FakeDedalusAPI() as api:
        yield discord_fake, api


@pytest.fixture(params=["redis", "sqlite"])
async def store(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> AsyncIterator[SessionStore]:
    """The store the bot processes share (one Redis, or one SQLite file), for reading it."""
    shared: SessionStore
    if request.param == "redis":
        shared = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
    else:
        shared = SqliteStore(tmp_path / "shared.sqlite3", StorePolicy(TEST_MODELS[0]))
    yield shared
    await shared.close()


@pytest.fixture
def environment(
    fakes: tuple[FakeDiscord, FakeDedalusAPI], store: SessionStore, redis_url: str, tmp_path: Path
) -> dict[str, str]:
    fake, api = fakes
    settings = {
        "MODEL_MAX_RETRIES": "0",
        "TURN_LEASE_SECONDS": str(LEASE_SECONDS),
        "LOG_LEVEL": "DEBUG",
    }
    if isinstance(store, RedisStore):
        return bot_environment(fake, api, redis_url, **settings)
    sqlite_path = str(tmp_path / "shared.sqlite3")
    return bot_environment(fake, api, None, SQLITE_PATH=sqlite_path, **settings)


@pytest.fixture
def bots(tmp_path: Path) -> Iterator[list[BotProcess]]:
    """Processes a test starts; whatever is left running is killed at the end."""
    started: list[BotProcess] = []
    yield started
    for bot in started:
        bot.stop()


async def test_a_message_whose_process_was_killed_mid_turn_is_answered_by_the_other(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    environment: dict[str, str],
    bots: list[BotProcess],
    store: SessionStore,
    tmp_path: Path,
) -> None:
    fake, api = fakes
    bots += [BotProcess(environment, tmp_path / f"bot{i}.log") for i in range(2)]
    wait_connected(bots)
    api.reply_text("never sent", delay=30)  # the first model call hangs: it is mid-turn
    said = fake.user_says(fake.general_id, fake.member, "who answers?", mentions_bot=True)

    def waiting_for_the_other() -> list[BotProcess]:
        return [bot for bot in bots if WAITING in bot.text()] if api.request_count == 1 else []

    waiting = await fake.wait_for(
        waiting_for_the_other,
        timeout=30,
        what="one process mid-turn and the other waiting for it",
    )
    (answering,) = [bot for bot in bots if bot not in waiting]
    answering.process.kill()
    killed = time.monotonic()
    await fake.wait_for(
        lambda: fake.bot_messages(fake.general_id), timeout=60, what="the survivor's answer"
    )
    assert time.monotonic() - killed < 4 * LEASE_SECONDS  # the lease, its poll, the answer
    # The survivor takes the channel's messages in order: once it has saved the turn of a
    # later one, it is done with the first, and any second answer to it would be there.
    fake.user_says(fake.general_id, fake.member, "and later", mentions_bot=True)
    deadline = time.monotonic() + 60
    while len(history := await store.read_history(scope_for(fake.general_id), "default")) < 4:
        assert time.monotonic() < deadline, "the later message's turn was never saved"
        await asyncio.sleep(0.05)
    answer, _later = fake.bot_messages(fake.general_id)
    assert answer.content == f"echo: [Bob Member (user id {fake.member_id})]: who answers?"
    assert answer.reply_to == said
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert api.request_count == 3
    assert "Traceback" not in waiting[0].text()
