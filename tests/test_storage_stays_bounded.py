"""No member can make the bot store without bound: a place keeps a limited number of sessions,
a message and a session a limited number of bytes, and the work each store call does stays
what the call needs, however many sessions a place has."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from bot.engine import Engine, EngineLimits
from bot.errors import MessageTooLarge
from bot.model import DedalusModel
from bot.store.base import Message, SessionSettings, SessionStore, StorePolicy, Ticket
from bot.store.redis import RedisStore, scope_key
from tests.conftest import TEST_MODELS
from tests.discord_harness import Harness
from tests.fakes.dedalus_api import FakeDedalusAPI

SETTINGS = SessionSettings(TEST_MODELS[0])


async def commands_run(raw: aioredis.Redis) -> int:
    """Redis commands executed so far, those run inside scripts included (not INFO itself,
    nor those that send or load a script or set up a connection)."""
    stats = await raw.info("commandstats")
    return sum(
        int(entry["calls"])
        for name, entry in stats.items()
        if not name.startswith(
            ("cmdstat_info", "cmdstat_eval", "cmdstat_script", "cmdstat_client", "cmdstat_hello")
        )
    )


async def place_with_sessions(store: RedisStore, scope: str, sessions: int) -> None:
    """`sessions` sessions, each with a few answered messages that can be deleted."""
    for n in range(sessions):
        await store.create_session(scope, f"s{n}", SETTINGS)
        for i in range(3):
            turn = await store.begin_turn(scope, Ticket.now(), 100_000, 10_000)
            added: list[Message] = [
                {"role": "user", "content": f"{scope} {n} {i}"},
                {"role": "assistant", "content": "ok"},
            ]
            assert await store.finish_turn(turn, added, f"{scope}-{n}-{i}")


async def test_forgetting_a_message_costs_the_same_however_many_sessions(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    """A message deleted in Discord is looked up in the place's index of stored messages,
    not searched for in every session (every deletion in a channel asks)."""
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0], sessions_per_place=25))
    await place_with_sessions(store, "few", 2)
    await place_with_sessions(store, "many", 24)
    costs: dict[str, list[int]] = {}
    for scope, sessions in (("few", 2), ("many", 24)):
        costs[scope] = []
        for ref in (f"{scope}-{sessions - 1}-1", f"{scope}-0-1", "never-stored"):
            before = await commands_run(raw_redis)
            forgotten = await store.forget_message(scope, ref)
            costs[scope].append(await commands_run(raw_redis) - before)
            assert forgotten == (ref != "never-stored")
    assert costs["few"] == costs["many"]
    assert max(costs["many"]) < 30  # type checks before writing included
    history = await store.read_history("many", "s0")
    assert {"role": "user", "content": "many 0 1"} not in history and len(history) == 5
    await store.close()


async def test_listing_sessions_is_bounded_by_the_limit(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    """/list (and /load's autocomplete, on every keystroke) looks at no more sessions than a
    place may keep, even where more were made under a higher limit."""
    roomy = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0], sessions_per_place=60))
    for n in range(40):
        await roomy.create_session("big", f"s{n}", SETTINGS)
    for n in range(10):
        await roomy.create_session("small", f"s{n}", SETTINGS)
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0], sessions_per_place=10))
    await store.list_sessions("elsewhere")  # its connection and script are set up
    costs = {}
    for scope, made in (("big", 40), ("small", 10)):
        before = await commands_run(raw_redis)
        listed = await store.list_sessions(scope)
        costs[scope] = await commands_run(raw_redis) - before
        assert {s.name for s in listed} == {f"s{n}" for n in range(made - 10, made)}
    assert costs["big"] == costs["small"]
    await roomy.close()
    await store.close()


async def test_an_expired_session_leaves_the_index_of_deletable_messages(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    """With a TTL, a session not used for it goes while its place stays in use; the place's
    index of deletable messages then drops that session's entries too."""
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0], ttl_seconds=3))
    await place_with_sessions(store, "p", 2)  # s0 then s1 (current), three refs each
    index = scope_key("p", "refindex")
    assert await raw_redis.hlen(index) == 6
    deadline = asyncio.get_running_loop().time() + 60
    while await raw_redis.hlen(index) > 3:
        assert asyncio.get_running_loop().time() < deadline
        turn = await store.begin_turn("p", Ticket.now(), 100_000, 10_000)  # s1 stays in use
        await store.finish_turn(turn, [])
        await asyncio.sleep(0.2)
    assert sorted(await raw_redis.hkeys(index)) == ["p-1-0", "p-1-1", "p-1-2"]
    assert [s.name for s in await store.list_sessions("p")] == ["s1"]
    assert await store.forget_message("p", "p-1-1")
    await store.close()


async def test_a_damaged_index_sweep_does_not_stop_the_place(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0], ttl_seconds=60))
    await place_with_sessions(store, "p", 1)
    await raw_redis.hset(scope_key("p", "state"), "sweep", "junk")  # a hand edit, a bug
    turn = await store.begin_turn("p", Ticket.now(), 100_000, 10_000)  # turns go on
    assert await store.finish_turn(turn, [{"role": "user", "content": "still here"}])
    assert await raw_redis.hget(scope_key("p", "state"), "sweep") is None
    await store.close()


async def test_the_queue_of_a_place_expires_without_a_ttl(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    """A turn that waited and then vanished leaves nothing behind for long (before, the
    queue and tickets keys of every place stayed forever)."""
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
    holder = await store.begin_turn("p", Ticket(order=1), 100_000, 10_000)
    with pytest.raises(Exception, match="busy"):
        await store.begin_turn("p", Ticket(order=2), 100_000, 10_000)  # never asks again
    await store.finish_turn(holder, [])
    queue, tickets = scope_key("p", "queue"), scope_key("p", "tickets")
    assert await raw_redis.exists(queue, tickets) == 2
    deadline = asyncio.get_running_loop().time() + 60
    while await raw_redis.exists(queue, tickets):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)
    await store.close()


async def test_an_answer_over_the_message_cap_is_stored_cut_and_the_turn_kept(
    store: SessionStore,
) -> None:
    """The user sees the whole answer; history keeps a cut copy with a note, and a tool call
    too large to keep is left out with its result, so the turn is never lost."""
    cap = 8 * 1024
    with FakeDedalusAPI() as api:
        model = DedalusModel.connect("test-key", api.base_url, timeout=5.0, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 100_000, message_cap_bytes=cap))
        api.reply_text("long " * 5_000)
        reply = await engine.reply("p", {"role": "user", "content": "write a lot"})
        assert reply.text == "long " * 5_000
        api.reply_tool_call("lookup", {"q": "x" * 20_000})
        api.reply_text("done")
        assert (await engine.reply("p", {"role": "user", "content": "look"})).text == "done"
        with pytest.raises(MessageTooLarge, match="over the limit of 8 KB per message"):
            await engine.reply("p", {"role": "user", "content": "y" * cap})
        assert api.request_count == 3  # the oversized message never reached the model
    history = await store.read_history("p", "default")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant", "assistant"]
    stored_answer = history[1]["content"]
    assert stored_answer.startswith("long long") and "cut here when stored" in stored_answer
    assert "cut here when stored" in history[3]["content"] and "tool_calls" not in history[3]
    assert history[4] == {"role": "assistant", "content": "done"}


async def test_an_oversized_message_is_refused_with_one_line(harness: Harness) -> None:
    """Ten 50 KB text files are about 500 KB: over the default 128 KB per message. The user
    is told the size and the limit; the model is not called and nothing is stored."""
    fake = harness.discord
    files = [fake.add_attachment(f"part{n}.txt", b"x" * 50_000, "text/plain") for n in range(10)]
    await harness.say(
        fake.general_id, fake.member, "read these", mentions_bot=True, attachments=files
    )
    [refusal] = await harness.answer(fake.general_id)
    assert refusal.content == (
        "⚠️ Your message (with its files) is 489 KB, over the limit of 128 KB per message; "
        "nothing was sent or stored. Send less text or fewer files."
    )
    assert harness.api.request_count == 0
    assert await harness.history(fake.general_id) == []
    await harness.say(fake.general_id, fake.member, "just this", mentions_bot=True)
    answers = await harness.answer(fake.general_id, 2)
    assert "echo" in answers[-1].content


async def test_new_over_the_session_limit_is_refused_with_one_line(harness: Harness) -> None:
    fake = harness.discord
    harness.policy = StorePolicy(TEST_MODELS[0], sessions_per_place=2)
    await harness.restart()
    for name in ("a", "b"):
        said = await harness.command(
            "new", {"name": name}, user=fake.member, channel_id=fake.general_id
        )
        assert said == f"Started new session: {name}"
    said = await harness.command("new", {"name": "c"}, user=fake.member, channel_id=fake.general_id)
    assert said == (
        "⚠️ This place already has 2 sessions, the most it may keep; nothing was created. "
        "Reuse one: /load it, then /clear it."
    )
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert "Session: b" in status
    said = await harness.command("new", user=fake.member, channel_id=fake.general_id)
    assert said.startswith("⚠️ This place already has 2 sessions")
