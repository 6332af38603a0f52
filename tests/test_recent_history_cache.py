"""Each bot process keeps its sessions' recent messages and asks Redis only for what is new
(`bot.store.recent`). Whatever several processes do to a conversation, in any order, a turn
must see exactly the newest stored messages that fit its budget: never a stale, missing,
duplicated or forgotten message."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from dataclasses import dataclass
from typing import cast

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.context import build_context, newest_within
from bot.store.base import (
    Message,
    SessionSettings,
    StorePolicy,
    Ticket,
    decode_message_array,
    encode_message,
    message_size,
    sendable_as_stored,
)
from bot.store.recent import MESSAGE_OVERHEAD_BYTES as OVERHEAD
from bot.store.recent import RecentCache, RecentWindow
from bot.store.redis import RedisStore
from tests.conftest import TEST_MODELS

SCOPE = "discord:1"
CAP = 8
"""A small history cap, so the oldest messages are trimmed within a few turns."""
CAP_BYTES = 900
"""A small byte cap too (each message is 20 to 300 bytes), so either cap may trim first."""
LIMITS = {"history_cap": CAP, "history_cap_bytes": CAP_BYTES, "message_cap_bytes": 400}


@dataclass(frozen=True)
class Turn:
    process: int
    room: int
    user_size: int
    answers: int
    fails: bool
    image: bool = False
    """The user message has content parts (text and an image)."""


@dataclass(frozen=True)
class Clear:
    process: int


@dataclass(frozen=True)
class Forget:
    process: int
    back: int
    """Which earlier user message: 1 is the latest."""


@dataclass(frozen=True)
class Switch:
    process: int
    name: str


@dataclass(frozen=True)
class Import:
    process: int
    messages: int
    system: bool = False
    """The imported history starts with a system message."""


@dataclass(frozen=True)
class Rewrite:
    """/retry or /undo of the last exchange. A retried answer is one short message (as a
    streamed one is), so the history never grows past its caps here: a rewrite leaves the
    oldest messages to the next turn's save."""

    process: int
    undo: bool


Step = Turn | Clear | Forget | Switch | Import | Rewrite

operations: st.SearchStrategy[Step] = st.one_of(
    st.builds(
        Turn,
        process=st.integers(0, 2),
        room=st.sampled_from([0, 60, 150, 400, 10_000]),
        user_size=st.integers(0, 120),
        answers=st.integers(1, 4),
        fails=st.booleans(),
        image=st.booleans(),
    ),
    st.builds(Clear, process=st.integers(0, 2)),
    st.builds(Forget, process=st.integers(0, 2), back=st.integers(1, 4)),
    st.builds(Switch, process=st.integers(0, 2), name=st.sampled_from(["default", "other"])),
    st.builds(Import, process=st.integers(0, 2), messages=st.integers(0, 12), system=st.booleans()),
    st.builds(Rewrite, process=st.integers(0, 2), undo=st.booleans()),
)


def text(size: int, tag: int) -> str:
    return f"#{tag} " + "x" * size


def text_of(message: Message) -> str:
    content = message.get("content")
    return str(content[0]["text"]) if isinstance(content, list) else str(content)


async def scenario(redis_url: str, steps: list[Step]) -> None:
    """Run `steps` through three processes (three stores, each with its own cache: the
    default, a tiny one that evicts almost everything, none) and check every turn's history
    against what Redis holds."""
    policies = [
        StorePolicy(TEST_MODELS[0], **LIMITS),
        StorePolicy(TEST_MODELS[0], **LIMITS, history_cache_bytes=300 + 4 * OVERHEAD),
        StorePolicy(TEST_MODELS[0], **LIMITS, history_cache_bytes=0),
    ]
    stores = [RedisStore.from_url(redis_url, policy) for policy in policies]
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await raw.flushall()
    refs: list[str] = []
    try:
        for tag, step in enumerate(steps):
            store = stores[step.process]
            if isinstance(step, Turn):
                turn = await store.begin_turn(SCOPE, Ticket.now(), step.room, 10_000)
                stored = await stores[2].read_history(SCOPE, turn.session.name)
                assert len(stored) <= CAP and sum(map(message_size, stored)) <= CAP_BYTES
                expected = newest_within(stored, step.room)
                assert turn.recent == expected, f"step {tag}: {step}"
                assert turn.recent_bytes == sum(message_size(m) for m in expected)
                assert turn.as_stored == all(sendable_as_stored(m) for m in expected)
                user: Message = {"role": "user", "content": text(step.user_size, tag)}
                if step.image:
                    image = {"type": "image_url", "image_url": {"url": "https://cdn/x.png"}}
                    user["content"] = [{"type": "text", "text": user["content"]}, image]
                system: Message = {"role": "system", "content": "system"}
                budget = step.room + message_size(system) + message_size(user)
                context = build_context(
                    "system", None, (), turn.recent, user, budget, recent_bytes=turn.recent_bytes
                )
                assert context == build_context(
                    "system",
                    None,
                    (),
                    turn.recent,
                    user,
                    budget,
                    recent_bytes=turn.recent_bytes,
                    as_stored=turn.as_stored,
                )
                answers: list[Message] = [
                    {"role": "assistant", "content": text(30 * i, tag)} for i in range(step.answers)
                ]
                added = [] if step.fails else [user, *answers]
                ref = f"m{tag}"
                assert await store.finish_turn(turn, added, ref if added else None)
                if added:
                    refs.append(ref)
            elif isinstance(step, Clear):
                await store.clear_session(SCOPE)
            elif isinstance(step, Forget):
                if len(refs) >= step.back:
                    ref = refs[-step.back]
                    stored_anywhere = [
                        m
                        for name in ("default", "other")
                        for m in await stores[2].read_history(SCOPE, name)
                        if m["role"] == "user" and text_of(m).startswith(f"#{ref[1:]} ")
                    ]
                    forgotten = await store.forget_message(SCOPE, ref)
                    assert forgotten == bool(stored_anywhere), f"step {tag}: {step}"
            elif isinstance(step, Switch):
                try:
                    await store.switch_session(SCOPE, step.name)
                except Exception:
                    await store.create_session(SCOPE, step.name, SessionSettings(TEST_MODELS[0]))
            elif isinstance(step, Rewrite):
                turn = await store.begin_turn(SCOPE, Ticket.now(), 10_000, 10_000)
                exchange = await store.last_exchange(turn)
                if exchange is None or not exchange.answered:
                    assert await store.finish_turn(turn, [])
                    continue
                new: list[Message] = [{"role": "assistant", "content": "r"}]
                assert await store.rewrite_last_exchange(turn, exchange, None if step.undo else new)
            elif isinstance(step, Import):
                history: list[Message] = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": text(i * 7, tag)}
                    for i in range(step.messages)
                ]
                if step.system:
                    history.insert(0, {"role": "system", "content": text(5, tag)})
                await store.import_sessions(
                    SCOPE, {"default": history}, SessionSettings(TEST_MODELS[0])
                )
    finally:
        for store in stores:
            await store.close()
        await raw.aclose()


def test_every_turn_sees_the_stored_history_whatever_other_processes_did(
    redis_url: str,
) -> None:
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(operations, min_size=1, max_size=30))
    def check(steps: list[Step]) -> None:
        asyncio.run(scenario(redis_url, steps))

    check()


@pytest.mark.parametrize("then_a_turn", [False, True], ids=["", "then-a-turn"])
@pytest.mark.parametrize(
    "change", ["clear", "forget", "import", "switch-and-back", "turns", "undo", "retry"]
)
async def test_what_another_process_did_at_the_history_cap_is_seen(
    redis_url: str, change: str, then_a_turn: bool
) -> None:
    """At the cap the stored length no longer grows, so only the generation tells a
    process that its cached messages were replaced: each way of replacing them, checked."""
    steps: list[Step] = [Turn(0, 10_000, 10, 1, False)]  # process 0 caches the session
    steps += [Turn(1, 10_000, 10, 1, False) for _ in range(CAP)]  # process 1 fills it
    replacements: dict[str, list[Step]] = {
        "clear": [Clear(1)],
        "forget": [Forget(1, 2)],
        "import": [Import(1, CAP)],
        "switch-and-back": [Switch(1, "other"), Turn(1, 10_000, 5, 1, False), Switch(1, "default")],
        "turns": [Turn(1, 10_000, 10, 3, False)],
        "undo": [Rewrite(1, undo=True)],
        "retry": [Rewrite(1, undo=False)],
    }
    steps += replacements[change]
    if then_a_turn:
        steps.append(Turn(1, 10_000, 10, 1, False))
    steps.append(Turn(0, 10_000, 10, 1, False))  # checked against what Redis holds
    await scenario(redis_url, steps)


async def test_a_process_sees_what_it_saved_as_a_restarted_one_would(redis_url: str) -> None:
    """The process that saved a turn keeps its messages for the next turn without reading
    them back: that copy must be what a process with nothing cached reads (JSON has no
    tuples and only text keys), and must not change when the caller's dicts do."""
    policy = StorePolicy(TEST_MODELS[0])
    saver, restarted = (
        RedisStore.from_url(redis_url, policy),
        RedisStore.from_url(redis_url, policy),
    )
    raw = aioredis.Redis.from_url(redis_url)
    await raw.flushall()
    await raw.aclose()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    chat: list[Message] = [
        {"role": "user", "content": "a plain line", "name": None},
        {"role": "assistant", "content": "an answer"},
    ]
    tools: list[Message] = [
        {"role": "user", "content": "use a tool"},
        {"role": "assistant", "content": None, "tool_calls": (call,)},
        {"role": "tool", "tool_call_id": "c1", "content": "7"},
    ]
    untyped: dict[object, object] = {"role": "user", "content": "x", 3: "a number as a key"}
    keyed = [cast(Message, untyped)]  # as a caller without type checks may hand it over

    async def seen_then_saved(store: RedisStore, added: list[Message]) -> list[Message]:
        """The history a turn of `store` begins with; the turn then saves `added`."""
        turn = await store.begin_turn(SCOPE, Ticket.now(), 10_000, 10_000)
        assert await store.finish_turn(turn, added)
        return turn.recent

    try:
        await seen_then_saved(saver, chat)
        chat[0]["content"] = "changed by the caller after the save"
        assert await seen_then_saved(saver, tools) == [
            {"role": "user", "content": "a plain line", "name": None},
            {"role": "assistant", "content": "an answer"},
        ]
        *_, tool_call, _ = await seen_then_saved(saver, keyed)
        assert tool_call["tool_calls"] == [call]
        *_, keyed_as_saved = await seen_then_saved(saver, [])
        assert keyed_as_saved["3"] == "a number as a key"
        assert await seen_then_saved(saver, []) == await seen_then_saved(restarted, [])
        assert saver.stats.cache_hits == 4  # served from what it kept, not read back
    finally:
        await saver.close()
        await restarted.close()


@pytest.mark.parametrize("cap_bytes", [None, 200_000], ids=["", "at-the-byte-cap"])
async def test_a_steady_conversation_moves_only_its_new_messages(
    redis_url: str, cap_bytes: int | None
) -> None:
    """With a long history, a process's first turn loads the whole window that fits the
    budget; its later turns bring only what was added (here: another process's turn), also
    when each turn drops the oldest messages to keep the session within its byte cap."""
    policy = StorePolicy(TEST_MODELS[0])
    if cap_bytes:
        policy = StorePolicy(TEST_MODELS[0], history_cap_bytes=cap_bytes)
    store, other = (RedisStore.from_url(redis_url, policy) for _ in range(2))
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    history: list[Message] = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text(300, i)}
        for i in range(1000)
    ]
    await store.import_sessions(SCOPE, {"default": history}, SessionSettings(TEST_MODELS[0]))

    async def sent_by_redis() -> int:
        """Bytes Redis has sent to its clients; the reply saying so is counted by the next
        call, so a measurement subtracts the size of one such reply."""
        return int((await raw.info("stats"))["total_net_output_bytes"])

    async def turn_output_bytes(process: RedisStore) -> tuple[int, int]:
        earlier = await sent_by_redis()
        before = await sent_by_redis()
        turn = await process.begin_turn(SCOPE, Ticket.now(), 64_000, 10_000)
        after = await sent_by_redis()
        await process.finish_turn(  # each turn drops at least one message at the byte cap
            turn, [{"role": "user", "content": "q" * 150}, {"role": "assistant", "content": "a"}]
        )
        info_reply = before - earlier  # INFO's own reply, a few bytes either way as digits grow
        return after - before - info_reply, len(turn.recent)

    first, first_count = await turn_output_bytes(store)
    later = []
    for _ in range(5):
        await turn_output_bytes(other)
        later.append(await turn_output_bytes(store))
    assert first > 60_000 and first_count > 150
    # Under 1 KB: the other process's turn (two messages), not the window of 150+.
    assert all(moved < 1_000 and count >= first_count for moved, count in later)
    for process in (store, other):
        await process.close()
    await raw.aclose()


def window(name: str, size: int) -> RecentWindow:
    return RecentWindow(name, "g", 1, 1, size, True, ({"role": "user"},), (size,), size)


def test_the_cache_keeps_to_its_size_dropping_the_least_recently_used() -> None:
    cache = RecentCache(max_bytes=3 * (300 + OVERHEAD) + 100)  # three windows of 300 fit
    for scope in "abcd":
        cache.put(scope, window(scope, 300))
    assert cache.size <= cache.max_bytes and cache.get("a") is None  # the oldest went first
    assert cache.get("b") is not None  # now the most recently used
    cache.put("e", window("e", 300))
    assert cache.get("b") is not None and cache.get("c") is None
    cache.put("huge", window("huge", 5_000))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.size <= cache.max_bytes
    off = RecentCache(max_bytes=0)
    off.put("a", window("a", 0))
    assert len(off) == 0


def test_the_cache_bound_is_memory_even_for_short_messages() -> None:
    """HISTORY_CACHE_MB bounds the memory the cache takes, measured: short chat lines take
    several times their stored size as Python objects, so counting only their stored bytes
    would let the cache grow to many times its bound."""
    bound = 1_000_000
    cache = RecentCache(max_bytes=bound)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for scope in range(200):
            stored = [
                encode_message({"role": "user", "content": f"[Ada] #{scope}.{i} hi"})
                for i in range(100)
            ]
            messages = decode_message_array("default", "[" + ",".join(stored) + "]")
            empty = RecentWindow("default", "g", 0, 0, 1_000_000, True)
            sizes = [len(text.encode()) for text in stored]
            cache.put(str(scope), empty.extended(messages, sizes, 100, 100))
            del stored, messages, sizes
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) > 0 and cache.size <= bound
    assert used < bound * 1.2, f"{used:,} bytes in memory for a {bound:,}-byte cache"


def test_a_window_knows_when_its_messages_can_be_sent_as_stored() -> None:
    """Context assembly skips rewriting only when no message in the part sent needs it: an
    image message (its parts become a note) or a stored system message, until the cap or
    the budget moves it out."""
    plain: Message = {"role": "user", "content": "hi"}
    image: Message = {"role": "user", "content": [{"type": "text", "text": "look"}]}
    start = RecentWindow("default", "g", 0, 0, 10_000, True)
    window = start.extended([plain, image, plain], [10, 10, 10], 3, 3)
    assert window.newest_within(10_000)[2] is False
    assert window.newest_within(10)[2] is True  # only the newest message fits
    window = window.extended([plain, plain], [10, 10], 5, 3)  # the cap keeps three
    assert window.messages == (plain, plain, plain)
    assert window.newest_within(10_000)[2] is True


@pytest.mark.parametrize("undo", [False, True], ids=["retry", "undo"])
async def test_a_rewrite_by_another_process_right_after_its_turn_is_seen(
    redis_url: str, undo: bool
) -> None:
    """Process 0 caches the session at its cap; process 1 writes its last answer again (the
    length stays at the cap) or takes it back: process 0's next turn sees exactly that."""
    steps: list[Step] = [Turn(1, 10_000, 10, 1, False) for _ in range(CAP // 2)]
    steps += [Turn(0, 10_000, 10, 1, False), Rewrite(1, undo), Turn(0, 10_000, 10, 1, False)]
    await scenario(redis_url, steps)
