"""When something fails, the person who asked is told what and what to do; the bot stays
connected and the session stays consistent."""

from __future__ import annotations

import asyncio

from tests.conftest import RedisServer
from tests.discord_harness import Harness


async def ask(harness: Harness, text: str, answers_before: int) -> str:
    fake = harness.discord
    await harness.say(fake.general_id, fake.member, text, mentions_bot=True)
    answers = await harness.answer(fake.general_id, answers_before + 1)
    return answers[-1].content


async def test_a_model_outage_is_explained_and_nothing_is_stored(harness: Harness) -> None:
    await ask(harness, "fine", 0)
    harness.api.reply_error(500)
    said = await ask(harness, "during the outage", 1)
    assert said == "⚠️ The model service is unavailable right now. Try again shortly."
    harness.api.reply_error(429)
    said = await ask(harness, "rate limited", 2)
    assert "rate limited" in said
    assert len(await harness.history(harness.discord.general_id)) == 2
    said = await ask(harness, "after", 3)
    assert said.startswith("echo: ")


async def test_a_stream_cut_midway_keeps_the_partial_text_and_says_so(harness: Harness) -> None:
    harness.api.reply_stream_error(after_text="The answer is", drop=True)
    said = await ask(harness, "question", 0)
    assert said.startswith("The answer is") and "broke off" in said
    assert await harness.history(harness.discord.general_id) == []


async def test_too_long_for_the_model_is_retried_shorter_and_noted(harness: Harness) -> None:
    await ask(harness, "one", 0)
    harness.api.reply_error(400, code="context_length_exceeded")
    harness.api.reply_text("short answer")
    said = await ask(harness, "two", 1)
    assert said.startswith("short answer") and "left out" in said


async def test_a_message_leaving_no_room_for_the_history_is_answered_with_a_note(
    harness: Harness,
) -> None:
    harness.budget_bytes = 1_000
    await harness.restart()
    said = await ask(harness, "short", 0)
    assert "earlier conversation" not in said
    said = await ask(harness, "long " * 200, 1)
    assert said.startswith("echo: ") and "long long" in said
    assert said.endswith(
        "-# The model saw this message without the earlier conversation: they did not fit "
        "the context budget together (CONTEXT_BUDGET_TOKENS)."
    )
    assert [m["role"] for m in harness.api.messages_sent()] == ["system", "user"]


async def test_storage_down_is_explained_and_the_bot_recovers(
    harness: Harness, redis_server: RedisServer
) -> None:
    fake = harness.discord
    await ask(harness, "before", 0)
    redis_server.stop()
    try:
        said = await ask(harness, "while down", 1)
        assert said == "⚠️ Storage is unavailable right now; nothing was changed. Try again shortly."
        interaction = fake.invoke("status", user=fake.member, channel_id=fake.general_id)
        reply = await fake.wait_interaction_reply(interaction)
        assert "Storage is unavailable" in reply.text and reply.ephemeral
        await asyncio.sleep(3)  # down for several seconds
        said = await ask(harness, "still down", 2)
        assert said.startswith("⚠️ Storage is unavailable")
    finally:
        redis_server.start()  # empty: this test server keeps nothing on disk
    said = await ask(harness, "after", 3)
    assert said.startswith("echo: ")
    assert harness.bot is not None and not harness.bot.is_closed()
    history = await harness.history(fake.general_id)
    assert [m["role"] for m in history] == ["user", "assistant"]  # whole turns only
