"""A conversation turn end to end: real store, the real SDK, the fake Dedalus API."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.commands import Commands
from bot.engine import Engine, EngineLimits
from bot.errors import ModelError
from bot.model import ContextTooLong, DedalusModel
from bot.store.base import SessionStore
from tests.conftest import TEST_MODELS
from tests.fakes.dedalus_api import FakeDedalusAPI

SYSTEM = "You are a test assistant."


@pytest.fixture
def api() -> Iterator[FakeDedalusAPI]:
    with FakeDedalusAPI() as fake:
        yield fake


def make_engine(
    store: SessionStore, api: FakeDedalusAPI, budget: int = 100_000, timeout: float = 30.0
) -> Engine:
    model = DedalusModel.connect("test-key", api.base_url, timeout=timeout, max_retries=0)
    return Engine(store, model, EngineLimits(system_prompt=SYSTEM, budget_bytes=budget))


@pytest.fixture
async def engine(store: SessionStore, api: FakeDedalusAPI) -> AsyncIterator[Engine]:
    yield make_engine(store, api)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def test_the_model_receives_the_whole_history(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore
) -> None:
    api.reply_text("Nice to meet you, Ada.")
    first = await engine.reply("chan", user("My name is Ada."))
    assert first.text == "Nice to meet you, Ada."
    api.reply_text("You are Ada.")
    await engine.reply("chan", user("Who am I?"))
    assert api.messages_sent() == [
        {"role": "system", "content": SYSTEM},
        user("My name is Ada."),
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        user("Who am I?"),
    ]
    assert len(await store.read_history("chan", "default")) == 4


async def test_a_tool_round_is_stored_and_sent_back(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore
) -> None:
    call_id = api.reply_tool_call("lookup", {"q": "x"})
    api.reply_text("Done looking.")
    reply = await engine.reply("chan", user("look it up"))
    assert reply.text == "Done looking."
    roles = [m["role"] for m in await store.read_history("chan", "default")]
    assert roles == ["user", "assistant", "tool", "assistant"]
    await engine.reply("chan", user("again"))
    sent = api.messages_sent()
    assert sent[2]["tool_calls"][0]["id"] == call_id
    assert sent[3]["tool_call_id"] == call_id


async def test_a_streamed_reply_arrives_in_pieces_and_is_saved_whole(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore
) -> None:
    text = "one two three four five six seven eight nine ten"
    api.reply_text(text)
    pieces: list[str] = []

    async def collect(delta: str) -> None:
        pieces.append(delta)

    reply = await engine.reply("chan", user("count"), on_text=collect)
    assert len(pieces) > 1 and "".join(pieces) == text == reply.text
    assert await store.read_history("chan", "default") == [
        user("count"),
        {"role": "assistant", "content": text},
    ]


@pytest.mark.parametrize(
    ("script", "said"),
    [
        (lambda api: api.reply_error(429), "rate limited"),
        (lambda api: api.reply_error(500), "unavailable"),
        (lambda api: api.reply_text("never", hold=threading.Event()), "timed out"),
        (lambda api: api.reply_malformed(), "could not read"),
        (lambda api: api.reply_malformed('{"hello": 1}'), "empty answer"),
    ],
    ids=["429", "500", "timeout", "malformed", "not-a-completion"],
)
async def test_model_faults_are_named_and_store_nothing(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore, script: object, said: str
) -> None:
    await engine.reply("chan", user("before"))
    script(api)  # type: ignore[operator]
    impatient = make_engine(store, api, timeout=1.0) if said == "timed out" else engine
    with pytest.raises(ModelError, match=said):
        await impatient.reply("chan", user("lost?"))
    history = await store.read_history("chan", "default")
    assert [m["content"] for m in history] == ["before", "echo: before"]
    after = await engine.reply("chan", user("after"))  # the session is not left locked
    assert after.text == "echo: after"


@pytest.mark.parametrize("drop", [False, True], ids=["error-event", "connection-cut"])
async def test_a_stream_broken_midway_stores_nothing(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore, drop: bool
) -> None:
    api.reply_stream_error(after_text="half an ans", drop=drop)

    async def ignore(delta: str) -> None:
        pass

    with pytest.raises(ModelError, match="broke off"):
        await engine.reply("chan", user("q"), on_text=ignore)
    assert await store.read_history("chan", "default") == []


async def test_too_long_for_the_model_retries_once_with_less_history(
    engine: Engine, api: FakeDedalusAPI
) -> None:
    for i in range(6):
        await engine.reply("chan", user(f"question {i}"))
    api.reply_error(400, code="context_length_exceeded", message="maximum context length is 8")
    api.reply_text("short answer")
    reply = await engine.reply("chan", user("last"))
    assert (reply.text, reply.shortened) == ("short answer", True)
    assert len(api.messages_sent(-1)) < len(api.messages_sent(-2))

    api.reply_error(400, code="context_length_exceeded")
    api.reply_error(400, code="context_length_exceeded")
    with pytest.raises(ContextTooLong):
        await engine.reply("chan", user("still too long"))


async def test_history_beyond_the_budget_is_cut_without_orphaning_tool_results(
    store: SessionStore, api: FakeDedalusAPI
) -> None:
    roomy = make_engine(store, api)
    for i in range(20):
        await roomy.reply("chan", user(f"filler {i} " + "x" * 100))
    api.reply_tool_call("lookup", {"q": "y" * 300})
    api.reply_text("tool answer")
    await roomy.reply("chan", user("use the tool"))

    tight = make_engine(store, api, budget=900)
    await tight.reply("chan", user("next"))
    sent = api.messages_sent()
    assert sent[0]["role"] == "system" and sent[1]["role"] == "user"
    assert len(sent) < 20
    call_ids = {c["id"] for m in sent for c in m.get("tool_calls", [])}
    results = {m["tool_call_id"] for m in sent if m["role"] == "tool"}
    assert call_ids == results
    await tight.background_done()  # the summary it started (past the budget) is written


async def test_commands_change_what_the_next_model_call_receives(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore
) -> None:
    commands = Commands(store, TEST_MODELS, TEST_MODELS[0])
    await engine.reply("chan", user("in default"))
    await commands.model("chan", "2")
    await commands.mcp_add("chan", "acme/search@v1")
    await commands.mcp_add("chan", "https://mcp.example.com/sse")
    await engine.reply("chan", user("second"))
    assert api.last_request["model"] in (TEST_MODELS[1], [TEST_MODELS[1]])
    # The SDK sends a versioned slug in its wire form, a URL as it is.
    wired = [{"slug": "acme/search", "version": "v1"}, "https://mcp.example.com/sse"]
    assert api.last_request["mcp_servers"] == wired

    await commands.new("chan", "fresh")
    await engine.reply("chan", user("in fresh"))
    assert [m["content"] for m in api.messages_sent()[1:]] == ["in fresh"]
    assert api.last_request["mcp_servers"] == wired  # settings carry over to a new session

    await commands.load("chan", "default")
    await commands.clear("chan")
    await engine.reply("chan", user("after clear"))
    assert [m["content"] for m in api.messages_sent()[1:]] == ["after clear"]


async def test_overlapping_messages_in_one_scope_are_answered_in_order(
    engine: Engine, store: SessionStore
) -> None:
    await asyncio.gather(*(engine.reply("busy", user(f"m{i}")) for i in range(20)))
    history = await store.read_history("busy", "default")
    assert [m["content"] for m in history] == [
        text for i in range(20) for text in (f"m{i}", f"echo: m{i}")
    ]


async def test_a_run_interrupted_mid_tool_call_stores_no_dangling_call(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore
) -> None:
    api.reply_tool_call("lookup", {"q": "x"})
    api.reply_error(500)  # the model call after the tool result fails
    with pytest.raises(ModelError, match="unavailable"):
        await engine.reply("chan", user("use a tool"))
    assert await store.read_history("chan", "default") == []
    assert (await engine.reply("chan", user("again"))).text == "echo: again"


async def test_an_imported_dangling_tool_call_never_reaches_the_model(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore, tmp_path: Path
) -> None:
    from bot.store.base import SessionSettings
    from bot.transfer import import_file

    dangling = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c9", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    orphan = {"role": "tool", "tool_call_id": "c404", "content": "lost"}
    sessions = {"default": [user("q"), dangling, orphan, {"role": "assistant", "content": "a"}]}
    (tmp_path / "s.json").write_text(json.dumps(sessions))
    await import_file(store, "chan", tmp_path / "s.json", SessionSettings(TEST_MODELS[0]))
    await engine.reply("chan", user("next"))
    assert [m["role"] for m in api.messages_sent()] == ["system", "user", "assistant", "user"]


async def test_only_the_new_message_sends_its_images(engine: Engine, api: FakeDedalusAPI) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/cat.png"}}
    with_image = {"role": "user", "content": [{"type": "text", "text": "look"}, image]}
    await engine.reply("chan", with_image)
    assert api.messages_sent()[1] == with_image
    await engine.reply("chan", user("and now?"))
    earlier = api.messages_sent()[1]
    assert earlier["content"].startswith("look\n[an image was shared here")
    assert "cdn.example.com" not in json.dumps(api.messages_sent())


async def test_a_turn_longer_than_the_lock_keeps_it_until_saved(
    store: SessionStore, api: FakeDedalusAPI
) -> None:
    """The session lock lapses after `lock_ms` so a crashed process cannot block a channel,
    but a live turn renews it: a slow answer is saved, and a turn from another process
    waits for it instead of slipping in between. (The turn renews every 0.67 s: a machine
    stalled for up to 1.3 s still renews in time.)"""
    model = DedalusModel.connect("test-key", api.base_url, timeout=30.0, max_retries=0)
    limits = EngineLimits(system_prompt=SYSTEM, budget_bytes=100_000, lock_ms=2_000)
    slow, other = Engine(store, model, limits), Engine(store, model, limits)
    api.reply_text("slow answer", delay=4.0)  # twice the lock's term
    api.reply_text("second answer")
    first = asyncio.create_task(slow.reply("chan", user("first")))
    while api.request_count == 0:  # noqa: ASYNC110 - the fake runs in another thread
        await asyncio.sleep(0.01)
    second = await other.reply("chan", user("second"))
    assert (await first).text == "slow answer" and second.text == "second answer"
    assert [m["content"] for m in await store.read_history("chan", "default")] == [
        "first",
        "slow answer",
        "second",
        "second answer",
    ]


async def test_retry_replaces_a_tool_round_and_sends_the_history_up_to_its_question(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore
) -> None:
    await engine.reply("chan", user("[Ada (user id 1)]: hello"))
    api.reply_tool_call("lookup", {"q": "x"})
    api.reply_text("Done looking.")
    await engine.reply("chan", user("[Ada (user id 1)]: look it up"))
    api.reply_text("Looked again.")
    retried = await engine.retry("chan", requester="1", manager=False)
    assert retried.text == "Looked again."
    assert [m.get("content") for m in api.messages_sent()] == [
        SYSTEM,
        "[Ada (user id 1)]: hello",
        "echo: [Ada (user id 1)]: hello",
        "[Ada (user id 1)]: look it up",
    ]
    history = await store.read_history("chan", "default")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[-1]["content"] == "Looked again."


async def test_retry_of_an_exchange_over_the_budget_still_sends_the_history_before(
    store: SessionStore, api: FakeDedalusAPI
) -> None:
    """The exchange alone is more than the context budget, so the turn's window cannot hold
    it: the history before it is read whole, and what fits is sent."""
    engine = make_engine(store, api, budget=1_500)
    await engine.reply("chan", user("short question"))
    api.reply_text("long answer " * 150)
    await engine.reply("chan", user("ask for a long answer"))
    await engine.retry("chan", requester="1", manager=True)
    assert [m.get("content") for m in api.messages_sent()] == [
        SYSTEM,
        "short question",
        "echo: short question",
        "ask for a long answer",
    ]


async def test_who_may_retry_or_undo_is_read_from_the_question(
    engine: Engine, store: SessionStore
) -> None:
    from bot.errors import NotYourExchange

    await engine.reply("chan", user("[Ada (user id 1)]: mine"))
    await engine.reply("chan", user("unlabelled, as the console stores it"))
    with pytest.raises(NotYourExchange):
        await engine.undo("chan", requester="1", manager=False)
    assert (await engine.undo("chan", requester="2", manager=True)).user == user(
        "unlabelled, as the console stores it"
    )
    with pytest.raises(NotYourExchange):
        await engine.retry("chan", requester="2", manager=False)
    assert len(await store.read_history("chan", "default")) == 2
    assert (
        (await engine.undo("chan", requester="1", manager=False)).user["content"].endswith("mine")
    )
    assert await store.read_history("chan", "default") == []


async def test_a_place_is_remembered_before_its_answer_for_the_next_start(
    engine: Engine, api: FakeDedalusAPI, store: SessionStore
) -> None:
    """The start-up catch-up looks only where the bot answered lately: a place must be on
    that record while its first answer is still being written, so a process that dies then
    leaves the message to the next one. A later turn there records nothing new to notice."""
    answering = threading.Event()
    api.reply_text("late answer", hold=answering)
    turn = asyncio.create_task(engine.reply("chan", user("first words here")))
    while api.request_count == 0:  # noqa: ASYNC110 - the fake runs in another thread
        await asyncio.sleep(0.01)
    try:
        assert [place.scope for place in await store.recent_places()] == ["chan"]
    finally:
        answering.set()
    assert (await turn).text == "late answer"
    await engine.reply("elsewhere", user("hello"))
    await engine.reply("chan", user("again"))
    assert [place.scope for place in await store.recent_places()] == ["elsewhere", "chan"]
