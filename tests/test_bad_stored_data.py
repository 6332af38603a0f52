"""A session whose stored data is damaged, or from an unknown format version, answers with a
clear error for that session only; other sessions are unaffected and /clear repairs it."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from bot.discord_bot.scopes import scope_for
from bot.store.redis import session_key
from tests.discord_harness import Harness

DAMAGED = "⚠️ Session 'default' cannot be read (damaged or from an unknown version)."


async def ask(harness: Harness, channel_id: int, text: str, answers_before: int) -> str:
    fake = harness.discord
    await harness.say(channel_id, fake.member, text, mentions_bot=True)
    return (await harness.answer(channel_id, answers_before + 1))[-1].content


@pytest.mark.parametrize(
    "damage",
    [
        ("rpush", "messages", "{not json"),
        ("rpush", "messages", '"a string, not a message"'),
        ("hset", "meta", "format", "99"),
        ("hset", "meta", "mcp", "not a list"),
    ],
    ids=["broken-json", "not-a-message", "unknown-version", "broken-settings"],
)
async def test_a_damaged_session_is_reported_and_repaired_by_clear(
    harness: Harness, raw_redis: aioredis.Redis, damage: tuple[str, ...]
) -> None:
    fake = harness.discord
    await ask(harness, fake.general_id, "hello", 0)
    command, part, *args = damage
    key = session_key(scope_for(fake.general_id), "default", part)
    await getattr(raw_redis, command)(key, *args)

    said = await ask(harness, fake.general_id, "still there?", 1)
    assert said.startswith(DAMAGED)
    assert (await ask(harness, fake.random_id, "other channel", 0)).startswith("echo: ")

    cleared = await harness.command("clear", user=fake.admin, channel_id=fake.general_id)
    assert cleared == "Cleared session: default"
    assert (await ask(harness, fake.general_id, "after repair", 2)).startswith("echo: ")
