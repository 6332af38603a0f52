"""Every channel, thread and DM is its own conversation, and it survives a restart."""

from __future__ import annotations

from tests.discord_harness import Harness


def contents(messages: list[dict[str, object]]) -> list[object]:
    return [m["content"] for m in messages]


async def test_two_channels_and_a_thread_stay_separate(harness: Harness) -> None:
    fake = harness.discord
    thread = fake.create_thread(fake.general_id, "side talk", owner=fake.member)

    await harness.say(fake.general_id, fake.member, "apples", mentions_bot=True)
    await harness.answer(fake.general_id)
    await harness.say(fake.random_id, fake.member, "bananas", mentions_bot=True)
    await harness.answer(fake.random_id)
    await harness.say(thread, fake.member, "cherries", mentions_bot=True)
    await harness.answer(thread)
    await harness.say(fake.general_id, fake.member, "and again", mentions_bot=True)
    await harness.answer(fake.general_id, 2)

    sent = [m["content"] for m in harness.api.messages_sent()[1:]]
    assert len(sent) == 3
    assert "apples" in sent[0] and "and again" in sent[2]
    assert not any("bananas" in s or "cherries" in s for s in sent)
    assert len(await harness.history(fake.random_id)) == 2
    assert len(await harness.history(thread)) == 2
    assert len(await harness.history(fake.general_id)) == 4


async def test_a_restart_keeps_the_history(harness: Harness) -> None:
    fake = harness.discord
    await harness.say(fake.general_id, fake.member, "remember 42", mentions_bot=True)
    await harness.answer(fake.general_id)

    await harness.restart()
    await harness.say(fake.general_id, fake.member, "what number?", mentions_bot=True)
    await harness.answer(fake.general_id, 2)

    sent = harness.api.messages_sent()
    assert "remember 42" in sent[1]["content"] and "what number?" in sent[3]["content"]


async def test_a_dm_is_answered_without_a_mention_and_kept_apart(harness: Harness) -> None:
    fake = harness.discord
    dm = fake.dm_channel(fake.member)
    await harness.say(dm, fake.member, "private question")
    [reply] = await harness.answer(dm)
    assert "private question" in reply.content
    assert len(await harness.history(dm)) == 2
    assert await harness.history(fake.general_id) == []
