"""Processes killed, stopped and restarted at any moment: every message addressed to the bot
is answered once. Real processes, real signals, one fake Discord, one store."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.discord_bot.conversation import INTERRUPTED
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


async def answering_and_waiting(
    fake: FakeDiscord, api: FakeDedalusAPI, bots: list[BotProcess]
) -> tuple[BotProcess, BotProcess]:
    """Once the message's one model call is in flight and the other process says it waits
    for it: the process answering it, and the one waiting."""

    def waiting_for_the_other() -> list[BotProcess]:
        return [bot for bot in bots if WAITING in bot.text()] if api.request_count == 1 else []

    waiting = await fake.wait_for(
        waiting_for_the_other,
        timeout=30,
        what="one process mid-turn and the other waiting for it",
    )
    (answering,) = [bot for bot in bots if bot not in waiting]
    return answering, waiting[0]


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

    answering, waiting = await answering_and_waiting(fake, api, bots)
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
    # The answer's last edit comes after the save: wait for it to be posted too.
    answer, _later = await fake.wait_for(
        lambda: fake.bot_messages(fake.general_id)[1:] and fake.bot_messages(fake.general_id),
        timeout=30,
        what="the later message's answer",
    )
    assert answer.content == f"echo: [Bob Member (user id {fake.member_id})]: who answers?"
    assert answer.reply_to == said
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert api.request_count == 3
    assert "Traceback" not in waiting.text()


async def stopped(bot: BotProcess, fake: FakeDiscord, within: float) -> int:
    """Wait for the process to exit; its exit status."""
    await fake.wait_for(lambda: bot.process.poll() is not None, timeout=within, what="its exit")
    return bot.process.wait()


async def test_sigterm_mid_turn_exits_at_once_and_the_other_process_answers(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    environment: dict[str, str],
    bots: list[BotProcess],
    store: SessionStore,
    tmp_path: Path,
) -> None:
    """Past the grace, the stopping process hands the message back: the other one answers
    it long before the lease would have lapsed."""
    fake, api = fakes
    env = environment | {"SHUTDOWN_GRACE_SECONDS": "1", "TURN_LEASE_SECONDS": "60"}
    bots += [BotProcess(env, tmp_path / f"bot{i}.log") for i in range(2)]
    wait_connected(bots)
    api.reply_text("never sent", delay=30)
    said = fake.user_says(fake.general_id, fake.member, "still there?", mentions_bot=True)

    answering, waiting = await answering_and_waiting(fake, api, bots)
    answering.process.terminate()
    asked = time.monotonic()
    assert await stopped(answering, fake, within=25) == 0
    await fake.wait_for(
        lambda: fake.bot_messages(fake.general_id), timeout=40, what="the other's answer"
    )
    assert time.monotonic() - asked < 45  # handed back: the 60 s lease did not have to lapse
    await asyncio.sleep(1)
    (answer,) = fake.bot_messages(fake.general_id)
    assert answer.reply_to == said
    history = await store.read_history(scope_for(fake.general_id), "default")
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert api.request_count == 2
    assert "Traceback" not in answering.text() + waiting.text()


async def test_sigterm_lets_the_turn_in_flight_finish_and_leaves_new_messages_to_the_next_start(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    environment: dict[str, str],
    bots: list[BotProcess],
    store: SessionStore,
    tmp_path: Path,
) -> None:
    fake, api = fakes
    env = environment | {"SHUTDOWN_GRACE_SECONDS": "20"}
    bots.append(BotProcess(env, tmp_path / "first.log"))
    wait_connected(bots)
    api.reply_text("worth the wait", delay=3)
    fake.user_says(fake.general_id, fake.member, "in flight", mentions_bot=True)
    await fake.wait_for(lambda: api.request_count == 1, timeout=30, what="the model call")
    bots[0].process.terminate()
    await fake.wait_for(lambda: "SIGTERM" in bots[0].text(), timeout=10, what="the signal")
    later = fake.user_says(fake.general_id, fake.member, "while stopping", mentions_bot=True)
    assert await stopped(bots[0], fake, within=30) == 0
    (answer,) = fake.bot_messages(fake.general_id)
    assert answer.content == "worth the wait"
    assert api.request_count == 1  # the message sent while stopping was left alone

    bots.append(BotProcess(env, tmp_path / "second.log"))
    wait_connected(bots[1:])
    answers = await fake.wait_for(
        lambda: fake.bot_messages(fake.general_id)[1:], timeout=30, what="the next start's answer"
    )
    await asyncio.sleep(1)
    assert (
        [a.reply_to for a in fake.bot_messages(fake.general_id)[1:]]
        == [later]
        == [a.reply_to for a in answers]
    )
    history = await store.read_history(scope_for(fake.general_id), "default")
    assert [m["content"] for m in history[1::2]] == [
        "worth the wait",
        f"echo: [Bob Member (user id {fake.member_id})]: while stopping",
    ]
    assert "Traceback" not in bots[0].text() + bots[1].text()


async def test_what_was_said_while_no_process_ran_is_answered_at_start_once_oldest_first(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    environment: dict[str, str],
    bots: list[BotProcess],
    store: SessionStore,
    tmp_path: Path,
) -> None:
    fake, api = fakes
    max_age = 20
    env = environment | {"BACKFILL_MAX_AGE_SECONDS": str(max_age), "BACKFILL_MAX_MESSAGES": "3"}
    dm = fake.dm_channel(fake.member)
    bots.append(BotProcess(env, tmp_path / "before.log"))
    wait_connected(bots)
    hello = fake.user_says(fake.general_id, fake.member, "hello", mentions_bot=True)
    fake.user_says(fake.random_id, fake.member, "hi", mentions_bot=True)
    fake.user_says(dm, fake.member, "hey")
    await fake.wait_for(
        lambda: all(fake.bot_messages(c) for c in (fake.general_id, fake.random_id, dm)),
        timeout=30,
        what="the first answers",
    )
    bots[0].process.terminate()
    assert await stopped(bots[0], fake, within=30) == 0

    fake.user_says(fake.general_id, fake.member, "too old", mentions_bot=True)
    await asyncio.sleep(max_age + 1)  # so that it is older than the limit at the next start
    a = fake.user_says(fake.general_id, fake.member, "a", mentions_bot=True)
    fake.user_says(fake.general_id, fake.member, "not for the bot")
    hello_answer = fake.bot_messages(fake.general_id)[0].id
    b = fake.user_says(fake.general_id, fake.member, "b", reply_to=hello_answer)
    rs = [fake.user_says(fake.random_id, fake.member, f"r{i}", mentions_bot=True) for i in range(4)]
    d = fake.user_says(dm, fake.member, "dm while away")

    bots += [BotProcess(env, tmp_path / f"after{i}.log") for i in range(2)]  # both catch up
    wait_connected(bots[1:])
    expected = {fake.general_id: [hello, a, b], fake.random_id: rs[1:], dm: [d]}
    expected[fake.random_id].insert(0, fake.bot_messages(fake.random_id)[0].reply_to or 0)
    expected[dm].insert(0, fake.bot_messages(dm)[0].reply_to or 0)

    def all_answered() -> bool:
        return all(len(fake.bot_messages(c)) >= len(ids) for c, ids in expected.items())

    await fake.wait_for(all_answered, timeout=60, what="the missed messages' answers")
    await asyncio.sleep(2)  # a second answer, or a late one, would show up now
    for channel, ids in expected.items():
        assert [m.reply_to for m in fake.bot_messages(channel)] == ids
    assert api.request_count == 9
    history = await store.read_history(scope_for(fake.general_id), "default")
    said = [m["content"].rsplit(": ", 1)[1] for m in history[0::2]]
    assert said == ["hello", "a", "b"]
    logs = "".join(bot.text() for bot in bots)
    assert "Traceback" not in logs, logs[logs.index("Traceback") - 3000 :][:6000]


async def test_an_answer_cut_short_by_sigterm_says_so_and_the_next_start_answers_it(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    environment: dict[str, str],
    bots: list[BotProcess],
    store: SessionStore,
    tmp_path: Path,
) -> None:
    fake, api = fakes
    env = environment | {"SHUTDOWN_GRACE_SECONDS": "1"}
    bots.append(BotProcess(env, tmp_path / "first.log"))
    wait_connected(bots)
    api.reply_text("half of an answer that never ends", chunk_size=12, chunk_delay=30)
    said = fake.user_says(fake.general_id, fake.member, "tell me", mentions_bot=True)
    await fake.wait_for(
        lambda: fake.bot_messages(fake.general_id), timeout=30, what="the first streamed words"
    )
    bots[0].process.terminate()
    assert await stopped(bots[0], fake, within=30) == 0
    (cut,) = fake.bot_messages(fake.general_id)
    assert cut.content.startswith("half of an ")
    assert INTERRUPTED in cut.content
    assert await store.read_history(scope_for(fake.general_id), "default") == []

    bots.append(BotProcess(env, tmp_path / "second.log"))
    wait_connected(bots[1:])
    await fake.wait_for(
        lambda: fake.bot_messages(fake.general_id)[1:], timeout=30, what="the next start's answer"
    )
    await asyncio.sleep(1)
    answers = fake.bot_messages(fake.general_id)
    assert [a.reply_to for a in answers] == [said, said]
    assert answers[1].content == f"echo: [Bob Member (user id {fake.member_id})]: tell me"
    history = await store.read_history(scope_for(fake.general_id), "default")
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert "Traceback" not in bots[0].text() + bots[1].text()


@pytest.mark.parametrize("stream", ["still-streaming", "streamed-while-frozen"])
async def test_a_process_frozen_mid_answer_removes_its_part_once_the_other_answered(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    environment: dict[str, str],
    bots: list[BotProcess],
    store: SessionStore,
    tmp_path: Path,
    stream: str,
) -> None:
    """Frozen (SIGSTOP) while streaming, past its lease: the other process takes the message
    over and answers it. On waking, the frozen one stops, deletes what it had posted, and
    says nothing more: the user sees one answer, the survivor's. Its model's answer may
    still be arriving then, or be all in already (it is about to save)."""
    fake, api = fakes
    bots += [BotProcess(environment, tmp_path / f"bot{i}.log") for i in range(2)]
    wait_connected(bots)
    if stream == "still-streaming":
        api.reply_text("partial words " * 60, chunk_size=14, chunk_delay=0.3)  # about 18 s
    else:  # about 3 s: done before the other process takes over, after a lease of 3 s
        api.reply_text("partial words " * 20, chunk_size=14, chunk_delay=0.15)
    said = fake.user_says(fake.general_id, fake.member, "who answers?", mentions_bot=True)

    frozen, _ = await answering_and_waiting(fake, api, bots)
    (partial,) = await fake.wait_for(
        lambda: fake.bot_messages(fake.general_id), timeout=30, what="the first part streamed"
    )
    assert partial.content.startswith("partial words")
    frozen.process.send_signal(signal.SIGSTOP)
    expected = f"echo: [Bob Member (user id {fake.member_id})]: who answers?"
    await fake.wait_for(
        lambda: any(m.content == expected for m in fake.bot_messages(fake.general_id)),
        timeout=60,
        what="the other process's answer, once the frozen one's lease lapsed",
    )
    frozen.process.send_signal(signal.SIGCONT)

    def frozen_parts_deleted() -> bool:
        everything = fake.messages_in(fake.general_id, include_deleted=True)
        parts = [m for m in everything if m.content.startswith("partial words")]
        return bool(parts) and all(m.deleted for m in parts)

    await fake.wait_for(
        frozen_parts_deleted, timeout=60, what="the frozen process's partial answer deleted"
    )
    await fake.wait_for(
        lambda: "taken over by another process" in frozen.text(),
        timeout=60,
        what="the frozen process saying why it stopped",
    )
    # Later turns are saved after this one: once one is, nothing more comes of the first.
    fake.user_says(fake.general_id, fake.member, "and later", mentions_bot=True)
    deadline = time.monotonic() + 60
    while len(history := await store.read_history(scope_for(fake.general_id), "default")) < 4:
        assert time.monotonic() < deadline, "the later message's turn was never saved"
        await asyncio.sleep(0.05)
    answer, later = fake.bot_messages(fake.general_id)
    assert (answer.content, answer.reply_to) == (expected, said)
    assert later.content.endswith("and later")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert history[1]["content"] == expected
    for bot in bots:
        assert "Traceback" not in bot.text()
