"""A conversation longer than the context budget keeps its beginning as a summary the model
wrote, through the real SDK and the fake Dedalus API, on both stores: the summary reaches
later model calls, no stored message is lost, no tool call is orphaned, two engines never
summarize one session at once, and a failed summary call leaves things as they were."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from bot.commands import Commands
from bot.context import SUMMARY_HEADING
from bot.engine import Engine, EngineLimits
from bot.errors import InvalidInput, SummaryFailed, SummaryInProgress
from bot.model import DedalusModel
from bot.store.base import Message, SessionStore, StorePolicy, message_size
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore
from tests.conftest import TEST_MODELS
from tests.fakes.dedalus_api import SUMMARY_PREFIX, FakeDedalusAPI

SYSTEM = "You are a test assistant."
BUDGET = 2_400
SCOPE = "chan"


@pytest.fixture
def api() -> Iterator[FakeDedalusAPI]:
    with FakeDedalusAPI() as fake:
        yield fake


@pytest.fixture(params=["redis", "sqlite"])
async def stores(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path, policy: StorePolicy
) -> AsyncIterator[tuple[SessionStore, SessionStore]]:
    """Two stores over the same data, as two processes have: one Redis, or one SQLite file."""
    made: list[SessionStore] = []
    for _ in range(2):
        if request.param == "redis":
            made.append(RedisStore.from_url(redis_url, policy))
        else:
            made.append(SqliteStore(tmp_path / "sessions.sqlite3", policy))
    yield made[0], made[1]
    for store in made:
        await store.close()


def make_engine(
    store: SessionStore, api: FakeDedalusAPI, budget: int = BUDGET, summaries: bool = True
) -> Engine:
    model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
    limits = EngineLimits(system_prompt=SYSTEM, budget_bytes=budget, summaries=summaries)
    return Engine(store, model, limits)


def user(text: str) -> Message:
    return {"role": "user", "content": text}


async def turn(engine: Engine, text: str) -> None:
    """One message answered, in a task of its own as the Discord glue runs each message (a
    turn's task is tracked until it ends, so `drain` must not be called from it)."""
    await asyncio.create_task(engine.reply(SCOPE, user(text)))


def filler(i: int) -> str:
    return f"message {i} about topic {i * 7} " + "x" * 60


async def until(what: str, check: Callable[[], Awaitable[bool]], seconds: float = 60) -> None:
    """Wait for a condition the bot brings about in the background."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def summary_sent(messages: list[Message]) -> str | None:
    found = [
        m["content"]
        for m in messages
        if m["role"] == "system" and str(m["content"]).startswith(SUMMARY_HEADING)
    ]
    assert len(found) <= 1
    return found[0] if found else None


def assert_paired(messages: list[Message]) -> None:
    called = sorted(c["id"] for m in messages for c in m.get("tool_calls") or [])
    answered = sorted(m["tool_call_id"] for m in messages if m["role"] == "tool")
    assert called == answered


async def test_a_long_conversation_keeps_its_beginning_as_a_summary(
    stores: tuple[SessionStore, SessionStore], api: FakeDedalusAPI
) -> None:
    store = stores[0]
    engine = make_engine(store, api)
    await turn(engine, "My name is Ada and my cat is called Pixel.")
    turns = 1
    for i in range(40):
        if i % 9 == 4:  # now and then a tool round, stored with its result
            api.reply_tool_call("lookup", {"q": f"query {i}"})
            api.reply_text(f"looked up {i}")
        await turn(engine, filler(i))
        turns += 1
        for body in api.requests:  # every request the turns sent so far
            assert_paired(body["messages"])
            if body["messages"][-1]["role"] == "user":  # not the runner's own tool rounds
                assert sum(map(message_size, body["messages"])) <= BUDGET

    async def covers_ada() -> bool:
        summary = await store.read_summary(SCOPE, "default")
        return summary is not None and summary.covered > 20

    await until("the summary to cover the older half", covers_ada)
    await turn(engine, "What is my cat called?")
    sent = api.messages_sent()
    summary = summary_sent(sent)
    assert summary is not None and SUMMARY_PREFIX in summary
    assert "My name is Ada and my cat is called Pix" in summary  # reached the model
    assert "Pixel" not in json.dumps([m for m in sent if m["role"] != "system"])
    assert sent[2]["role"] == "user"  # the history after it starts at a user message
    assert sum(map(message_size, sent)) <= BUDGET
    assert_paired(sent)
    history = await store.read_history(SCOPE, "default")
    assert history[0] == user("My name is Ada and my cat is called Pixel.")
    assert len([m for m in history if m["role"] == "user"]) == turns + 1  # none lost
    # Each stretch of history was summarized once: no message went to two summary calls.
    folded = [
        line
        for body in api.summary_requests
        for line in body["messages"][1]["content"].partition("came after it:\n")[2].splitlines()
        if line.startswith("user: ")
    ]
    assert len(folded) == len(set(folded)) > 0
    await engine.background_done()  # a summary still being written would move `covered`
    status = await Commands(store, TEST_MODELS, TEST_MODELS[0]).status(SCOPE)
    covered = (await store.read_summary(SCOPE, "default")).covered  # type: ignore[union-attr]
    assert f"Summary: covers the first {covered} messages" in status


async def test_two_engines_never_summarize_one_session_at_once(
    stores: tuple[SessionStore, SessionStore], api: FakeDedalusAPI
) -> None:
    quiet = make_engine(stores[0], api, summaries=False)
    for i in range(30):
        await turn(quiet, filler(i))
    held = threading.Event()
    api.hold_summaries(held)
    first, second = make_engine(stores[0], api), make_engine(stores[1], api)
    await turn(first, "one more")  # past the budget: a summary starts

    async def asked() -> bool:
        return len(api.summary_requests) == 1

    await until("the first summary request", asked)
    await turn(second, "and another")  # due too, but the session is leased
    with pytest.raises(SummaryInProgress, match="being written right now"):
        await Commands(stores[1], TEST_MODELS, TEST_MODELS[0], second.summaries).compact(SCOPE)
    await second.drain(30)  # its background attempt, if any, is over
    assert len(api.summary_requests) == 1
    held.set()

    async def saved() -> bool:
        return await stores[1].read_summary(SCOPE, "default") is not None

    await until("the summary to be saved", saved)
    await first.drain(30)
    assert len(api.summary_requests) == 1
    third = make_engine(stores[1], api)
    await turn(third, "last")
    assert summary_sent(api.messages_sent()) is not None
    await third.background_done()


async def test_a_failed_summary_call_leaves_the_conversation_as_before(
    stores: tuple[SessionStore, SessionStore],
    api: FakeDedalusAPI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = stores[0]
    quiet = make_engine(store, api, summaries=False)
    for i in range(30):
        await turn(quiet, filler(i))
    api.reply_summary_error(500)
    engine = make_engine(store, api)
    with caplog.at_level(logging.WARNING, logger="bot"):
        await turn(engine, "past the budget")

        async def logged() -> bool:
            return any("no summary of older messages" in r.getMessage() for r in caplog.records)

        await until("the failure to be logged", logged)
        await turn(engine, "next")
        await engine.drain(30)
    lines = [r for r in caplog.records if "summar" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "\n" not in lines[0].getMessage()
    assert len(api.summary_requests) == 1  # not tried again at once
    sent = api.messages_sent()
    assert summary_sent(sent) is None  # the oldest messages are cut, as without summaries
    assert sent[1]["role"] == "user" and sent[1]["content"] != filler(0)
    assert sum(map(message_size, sent)) <= BUDGET
    assert await store.read_summary(SCOPE, "default") is None
    assert len(await store.read_history(SCOPE, "default")) == 2 * 32  # nothing lost


async def test_compact_summarizes_now_and_clear_drops_the_summary(
    stores: tuple[SessionStore, SessionStore], api: FakeDedalusAPI
) -> None:
    store = stores[0]
    engine = make_engine(store, api, budget=100_000)
    commands = Commands(store, TEST_MODELS, TEST_MODELS[0], engine.summaries)
    with pytest.raises(InvalidInput, match="no messages yet"):
        await commands.compact(SCOPE)
    assert api.summary_requests == []
    for i in range(3):
        await turn(engine, f"fact {i}: the sky is colour {i}")
    api.reply_summary_error(503)
    with pytest.raises(SummaryFailed, match="could not be written"):
        await commands.compact(SCOPE)
    assert await store.read_summary(SCOPE, "default") is None
    assert "Summary: none" in await commands.status(SCOPE)

    said = await commands.compact(SCOPE)
    assert said.startswith("Summary covers the first 6 messages")
    assert "Summary: covers the first 6 messages" in await commands.status(SCOPE)
    with pytest.raises(InvalidInput, match="Nothing new to summarize"):
        await commands.compact(SCOPE)
    await turn(engine, "what colour?")
    sent = api.messages_sent()
    assert [m["role"] for m in sent] == ["system", "system", "user"]
    assert "fact 2: the sky is colour 2" in str(summary_sent(sent))
    assert len(await store.read_history(SCOPE, "default")) == 8

    await commands.clear(SCOPE)
    assert "Summary: none" in await commands.status(SCOPE)
    await turn(engine, "fresh start")
    assert api.messages_sent() == [{"role": "system", "content": SYSTEM}, user("fresh start")]


async def test_shutdown_lets_a_summary_in_progress_finish_or_hands_it_back(
    stores: tuple[SessionStore, SessionStore], api: FakeDedalusAPI
) -> None:
    quiet = make_engine(stores[0], api, summaries=False)
    for i in range(30):
        await turn(quiet, filler(i))
    held = threading.Event()
    api.hold_summaries(held)
    engine = make_engine(stores[0], api)
    await turn(engine, "past the budget")

    async def asked() -> bool:
        return len(api.summary_requests) == 1

    await until("the summary request", asked)
    draining = asyncio.create_task(engine.drain(60))
    held.set()
    await draining  # it waited for the summary, which was saved
    assert await stores[0].read_summary(SCOPE, "default") is not None

    # Cut short by a shutdown with no grace left, a summary hands its lease back.
    held.clear()
    for i in range(20):
        await turn(quiet, filler(100 + i))
    other = make_engine(stores[0], api)
    await turn(other, "past the budget again")

    async def asked_again() -> bool:
        return len(api.summary_requests) == 2

    await until("the second summary request", asked_again)
    await other.drain(0)
    api.hold_summaries(None)
    commands = Commands(
        stores[1], TEST_MODELS, TEST_MODELS[0], make_engine(stores[1], api).summaries
    )
    assert (await commands.compact(SCOPE)).startswith("Summary covers the first")
