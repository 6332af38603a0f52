"""With `maxmemory-policy noeviction` (the deploy guide's setting) a full Redis refuses writes
rather than dropping sessions: the person who asked is told storage is unavailable, the log
says why in one line, and the bot answers again once there is room."""

from __future__ import annotations

import logging

import pytest
import redis

from tests.discord_harness import Harness


async def test_a_full_redis_is_storage_unavailable_then_recovers(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake = harness.discord
    client = redis.Redis.from_url(harness.redis_url)
    await harness.say(fake.general_id, fake.member, "before", mentions_bot=True)
    await harness.answer(fake.general_id, 1)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # less than it holds: full
    try:
        await harness.say(fake.general_id, fake.member, "while full", mentions_bot=True)
        said = (await harness.answer(fake.general_id, 2))[-1].content
    finally:
        client.config_set("maxmemory", 0)
        client.close()
    assert said == "⚠️ Storage is unavailable right now; nothing was changed. Try again shortly."
    full = [r for r in caplog.records if "Redis is full" in r.getMessage()]
    assert full and all(r.levelno == logging.WARNING and not r.exc_info for r in full)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await harness.say(fake.general_id, fake.member, "after", mentions_bot=True)
    assert (await harness.answer(fake.general_id, 3))[-1].content.startswith("echo: ")
    assert len(await harness.history(fake.general_id)) == 4
