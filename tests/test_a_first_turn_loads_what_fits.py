"""A session's first turn in a process (nothing of it cached, as after a restart) loads the
newest messages that fit the budget, whatever the session holds: on a single Redis the
store reads them beside `begin_turn` in one transaction for the session it expects, and
must come to the same window as the script would, also when the session is another, when
more messages fit than that read brings, or when sizes are counted in UTF-8 bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.store.base import Message, SessionSettings, StorePolicy, Ticket, encode_message
from bot.store.redis import FIRST_READ_MESSAGES, RedisStore
from tests.conftest import TEST_MODELS

SCOPE = "discord:42"
SETTINGS = SessionSettings(TEST_MODELS[0])
LOCK_MS = 30_000


def conversation(count: int, text: str = "message") -> list[Message]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{text} {i}"}
        for i in range(count)
    ]


def newest_within(messages: list[Message], budget: int) -> list[Message]:
    """The window by the rule the store promises: newest first, while the stored bytes fit."""
    kept: list[Message] = []
    used = 0
    for message in reversed(messages):
        size = len(encode_message(message).encode())
        if used + size > budget:
            break
        used += size
        kept.append(message)
    return kept[::-1]


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[list[RedisStore]]:
    """Stores opened as the test asks, each a new process's (nothing cached)."""
    opened: list[RedisStore] = []
    yield opened
    for store in opened:
        await store.close()


def fresh(redis_url: str, stores: list[RedisStore]) -> RedisStore:
    policy = StorePolicy(default_model=TEST_MODELS[0], ttl_seconds=0, history_cap=2000)
    store = RedisStore.from_url(redis_url, policy)
    stores.append(store)
    return store


async def first_turn(store: RedisStore, budget: int) -> list[Message]:
    turn = await store.begin_turn(SCOPE, Ticket.now(), budget, LOCK_MS)
    await store.finish_turn(turn, [])
    return turn.recent


@pytest.mark.parametrize(
    ("count", "budget_messages"),
    [
        (20, None),  # all of it fits
        (FIRST_READ_MESSAGES + 40, None),  # all fits, more than the read beside it brings
        (FIRST_READ_MESSAGES + 40, 100),  # only the newest 100 or so fit
        (FIRST_READ_MESSAGES, FIRST_READ_MESSAGES),  # all fit, exactly what was read
    ],
)
async def test_the_first_turn_loads_the_newest_messages_that_fit(
    redis_url: str, stores: list[RedisStore], count: int, budget_messages: int | None
) -> None:
    history = conversation(count)
    size = len(encode_message(history[-1]))
    budget = 10_000_000 if budget_messages is None else budget_messages * size + size // 2
    await fresh(redis_url, stores).import_sessions(SCOPE, {"default": history}, SETTINGS)

    loaded = await first_turn(fresh(redis_url, stores), budget)

    assert loaded == newest_within(history, budget)
    if budget_messages is None:
        assert loaded == history


async def test_the_first_turn_of_a_place_using_another_session_loads_that_one(
    redis_url: str, stores: list[RedisStore]
) -> None:
    default, other = conversation(30, "in default"), conversation(12, "in other")
    setup = fresh(redis_url, stores)
    await setup.import_sessions(SCOPE, {"default": default, "other": other}, SETTINGS)
    await setup.switch_session(SCOPE, "other")

    assert await first_turn(fresh(redis_url, stores), 10_000_000) == other


async def test_sizes_are_counted_in_utf8_bytes_at_the_edge_of_the_budget(
    redis_url: str, stores: list[RedisStore]
) -> None:
    history = conversation(40, "héllo wörld ✓ 日本語")
    await fresh(redis_url, stores).import_sessions(SCOPE, {"default": history}, SETTINGS)
    chars = len(encode_message(history[-1]))
    encoded = len(encode_message(history[-1]).encode())
    assert encoded > chars  # the budget below cuts differently by bytes than by characters
    budget = 10 * encoded

    loaded = await first_turn(fresh(redis_url, stores), budget)

    assert loaded == newest_within(history, budget)
    assert len(loaded) == 10
