"""A message its author deletes while the bot is still answering it leaves no trace in the
history: the deletion arrives before there is anything to delete, and the store remembers it
so the turn saves neither the question nor its answer."""

from __future__ import annotations

import asyncio
import threading

import redis.asyncio as aioredis

from bot.discord_bot.scopes import scope_for
from bot.store.redis import scope_key
from tests.discord_harness import Harness


async def test_a_message_deleted_while_answered_is_not_stored(
    harness: Harness, raw_redis: aioredis.Redis
) -> None:
    fake, api = harness.discord, harness.api
    deleted = threading.Event()
    api.reply_text("an answer to a deleted question", hold=deleted)
    said = fake.user_says(fake.general_id, fake.member, "oops, not that", mentions_bot=True)
    await fake.wait_for(lambda: api.request_count >= 1, timeout=60, what="the model call")
    fake.delete_user_message(fake.general_id, said)
    marker = scope_key(scope_for(fake.general_id), f"forgot:{said}")
    deadline = asyncio.get_running_loop().time() + 60
    while not await raw_redis.exists(marker):  # the bot has seen the deletion
        assert asyncio.get_running_loop().time() < deadline, "the deletion was not handled"
        await asyncio.sleep(0.02)
    deleted.set()
    await harness.answer(fake.general_id, timeout=60)
    assert await harness.history(fake.general_id) == []
    fake.user_says(fake.general_id, fake.member, "the real question", mentions_bot=True)
    await harness.answer(fake.general_id, 2, timeout=60)
    question, answer = await harness.history(fake.general_id)  # only the later turn
    assert str(question["content"]).endswith("the real question")
    assert answer == {"role": "assistant", "content": f"echo: {question['content']}"}
