"""A session whose stored data is damaged, or from an unknown format version, answers with a
clear error for that session only; other sessions are unaffected and /clear repairs it."""

from __future__ import annotations

import logging

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
        ("hset", "meta", "mcp", "{}"),
        ("hset", "meta", "mcp", "[1]"),
        ("hset", "meta", "seq", "many"),
        ("set", "meta", "not a hash"),
        ("set", "messages", "not a list"),
    ],
    ids=[
        "broken-json",
        "not-a-message",
        "unknown-version",
        "broken-settings",
        "settings-object",
        "settings-numbers",
        "broken-counter",
        "meta-wrong-type",
        "messages-wrong-type",
    ],
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


DAMAGED_PLACE = "⚠️ This channel's stored state is damaged ("


@pytest.mark.parametrize(
    ("kind", "repair"),
    [
        ("state-type", "clear"),
        ("generations", "clear"),
        ("current-name", "clear"),
        ("queue-type", "new"),
        ("all-at-once", "clear"),
        ("all-at-once", "new"),
    ],
)
async def test_junk_in_a_channels_own_state_is_named_and_repaired(
    harness: Harness, kind: str, repair: str
) -> None:
    from tests.test_store_contract import REDIS_SCOPE_JUNK, scope_junk

    fake = harness.discord
    assert harness.store is not None
    await ask(harness, fake.general_id, "hello", 0)
    kinds = list(REDIS_SCOPE_JUNK) if kind == "all-at-once" else [kind]
    for each in sorted(kinds, key=lambda k: k.endswith("-type")):
        await scope_junk(harness.store, scope_for(fake.general_id), each)

    said = await ask(harness, fake.general_id, "still there?", 1)
    assert said.startswith(DAMAGED_PLACE), said
    assert said.endswith("/clear or /new repairs it.")
    assert (await ask(harness, fake.random_id, "other channel", 0)).startswith("echo: ")

    if repair == "clear":
        reply = await harness.command("clear", user=fake.admin, channel_id=fake.general_id)
        assert reply.startswith("Cleared session: ")
    else:
        reply = await harness.command("new", user=fake.member, channel_id=fake.general_id)
        assert reply.startswith("Started new session: ")
    assert (await ask(harness, fake.general_id, "after repair", 2)).startswith("echo: ")
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert "Messages: 2" in status


async def test_a_damaged_session_that_is_not_current_leaves_the_channel_working(
    harness: Harness, raw_redis: aioredis.Redis
) -> None:
    fake = harness.discord
    await ask(harness, fake.general_id, "hello", 0)
    assert await harness.command(
        "new", {"name": "work"}, user=fake.member, channel_id=fake.general_id
    )
    key = session_key(scope_for(fake.general_id), "default", "meta")
    await raw_redis.hset(key, "mcp", "{}")

    listed = await harness.command("list", user=fake.member, channel_id=fake.general_id)
    assert "default (unreadable: /load, then /clear)" in listed
    assert "* work (0 messages)" in listed
    started = await harness.command("new", user=fake.member, channel_id=fake.general_id)
    assert started == "Started new session: chat-1"
    assert (await ask(harness, fake.general_id, "in chat-1", 1)).startswith("echo: ")


@pytest.mark.parametrize("damage", ["channel-state", "session-meta"])
async def test_new_on_damaged_state_starts_with_the_configured_default_model(
    harness: Harness, raw_redis: aioredis.Redis, damage: str
) -> None:
    """The settings of a damaged place or session cannot be read, so /new falls back to
    DEFAULT_MODEL, not to whichever model happens to be allowed first."""
    from bot.store.base import StorePolicy
    from tests.conftest import TEST_MODELS
    from tests.test_store_contract import scope_junk

    fake = harness.discord
    harness.policy = StorePolicy(TEST_MODELS[1])
    await harness.restart()
    assert harness.store is not None
    await ask(harness, fake.general_id, "hello", 0)
    scope = scope_for(fake.general_id)
    if damage == "channel-state":
        await scope_junk(harness.store, scope, "state-type")
    else:
        await raw_redis.delete(session_key(scope, "default", "meta"))
        await raw_redis.set(session_key(scope, "default", "meta"), "not a hash")

    reply = await harness.command("new", user=fake.member, channel_id=fake.general_id)
    assert reply.startswith("Started new session: ")
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert f"Model: {TEST_MODELS[1]}" in status


async def test_load_autocomplete_on_a_damaged_channel_offers_nothing_and_logs_one_line(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.test_store_contract import scope_junk

    fake = harness.discord
    assert harness.store is not None
    await ask(harness, fake.general_id, "hello", 0)
    await scope_junk(harness.store, scope_for(fake.general_id), "names-type")

    choices = await fake.autocomplete("load", "name", "", fake.member, fake.general_id)
    assert choices == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "/load" in r.message]
    assert len(warnings) == 1, caplog.text
    assert "damaged" in warnings[0].message
    assert not [r for r in caplog.records if r.exc_info], caplog.text


@pytest.mark.parametrize("damage", ["channel", "session"])
async def test_a_deletion_damaged_data_prevents_is_one_warning_line(
    harness: Harness, raw_redis: aioredis.Redis, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """Before, junk in the channel's ref index skipped the deletion silently, and a session
    key of the wrong type ended in a traceback."""
    from tests.test_store_contract import scope_junk

    fake = harness.discord
    assert harness.store is not None
    said = await harness.say(fake.general_id, fake.member, "delete me later", mentions_bot=True)
    await harness.answer(fake.general_id, 1)
    scope = scope_for(fake.general_id)
    if damage == "channel":
        await scope_junk(harness.store, scope, "refindex-type")
    else:
        await raw_redis.delete(session_key(scope, "default", "refs"))
        await raw_redis.set(session_key(scope, "default", "refs"), "junk")

    fake.delete_user_message(fake.general_id, said)
    [line] = await fake.wait_for(
        lambda: [r for r in caplog.records if "could not forget" in r.message],
        what="the deletion's warning",
    )
    await harness.settled()
    assert line.levelno == logging.WARNING
    named = {
        "channel": "stored state is damaged (its refindex key has the wrong type)",
        "session": "Session 'default' cannot be read",
    }
    assert named[damage] in line.message
    assert not [r for r in caplog.records if r.exc_info], caplog.text
