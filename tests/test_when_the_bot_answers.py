"""When the bot speaks up: mentions and replies by default, every message or a thread per
mention when an admin says so, always in DMs and its own threads, never to itself."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from tests.discord_harness import Harness
from tests.fakes.discord_world import Perm


async def only_a_later_mention_is_answered(harness: Harness, channel_id: int) -> None:
    """Shows the bot let the channel's earlier messages pass: it takes a channel's messages
    in order, so once it has answered a later mention it has decided on each of them, and
    that answer must be the only new one."""
    before = len(harness.answers(channel_id))
    await harness.say(channel_id, harness.discord.member, "a later mention", mentions_bot=True)
    answers = await harness.answer(channel_id, before + 1)
    assert len(answers) == before + 1 and "a later mention" in answers[-1].content


async def test_by_default_only_mentions_and_replies_are_answered(harness: Harness) -> None:
    fake = harness.discord
    await harness.say(fake.general_id, fake.member, "people chatting among themselves")
    await harness.say(fake.general_id, fake.member, "hello bot", mentions_bot=True)
    [first] = await harness.answer(fake.general_id)  # the only answer: the chat got none
    assert "hello bot" in first.content
    await harness.say(fake.general_id, fake.admin, "tell me more", reply_to=first.id)
    await harness.answer(fake.general_id, 2)
    assert harness.api.request_count == 2
    assert len(await harness.history(fake.general_id)) == 4


async def test_answer_every_message_after_mode_all(harness: Harness) -> None:
    fake = harness.discord
    said = await harness.command(
        "mode", {"mode": "all"}, user=fake.admin, channel_id=fake.general_id
    )
    assert "Reply mode: all" in said
    await harness.say(fake.general_id, fake.member, "no mention needed now")
    [reply] = await harness.answer(fake.general_id)
    assert "no mention needed now" in reply.content
    await harness.say(fake.random_id, fake.member, "other channels keep the default")
    await only_a_later_mention_is_answered(harness, fake.random_id)


async def test_thread_mode_opens_a_thread_per_mention_and_continues_there(
    harness: Harness,
) -> None:
    fake = harness.discord
    await harness.command("mode", {"mode": "threads"}, user=fake.admin, channel_id=fake.general_id)
    asked = await harness.say(fake.general_id, fake.member, "plan a trip", mentions_bot=True)
    thread = asked  # a thread started from a message takes the message's id
    [reply] = await harness.answer(thread)
    assert "plan a trip" in reply.content
    assert harness.answers(fake.general_id) == []

    await harness.say(thread, fake.member, "somewhere warm")  # no mention: its own thread
    await harness.answer(thread, 2)
    assert len(await harness.history(thread)) == 4
    assert await harness.history(fake.general_id) == []


async def test_thread_mode_answers_several_mentions_at_once(harness: Harness) -> None:
    """Each mention gets a thread, a session of its own: their answers run in parallel
    (before, the channel's arrival lock was held while each answer was written, so the
    mentions waited for each other)."""
    fake, api = harness.discord, harness.api
    await harness.command("mode", {"mode": "threads"}, user=fake.admin, channel_id=fake.general_id)
    released = threading.Event()  # every model call waits: only turns running at once
    for _ in range(4):  # can all reach the model
        api.reply_text("an answer", hold=released)
    asked = [
        await harness.say(fake.general_id, fake.member, f"question {i}", mentions_bot=True)
        for i in range(4)
    ]
    await fake.wait_for(lambda: api.request_count == 4, 30, what="four model calls at once")
    released.set()
    for thread in asked:  # a thread started from a message takes its id
        [reply] = await harness.answer(thread, timeout=60)
        assert reply.content == "an answer"
    assert harness.answers(fake.general_id) == []


async def test_thread_mode_answers_in_the_channel_when_a_thread_cannot_be_opened(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake = harness.discord
    await harness.command("mode", {"mode": "threads"}, user=fake.admin, channel_id=fake.general_id)
    fake.set_permission_overwrite(fake.general_id, fake.bot_id, deny=Perm.CREATE_PUBLIC_THREADS)
    asked = await harness.say(fake.general_id, fake.member, "plan a trip", mentions_bot=True)

    [reply] = await harness.answer(fake.general_id)
    assert "plan a trip" in reply.content and reply.reply_to == asked
    thread_requests = [r for r in fake.requests if r.path.endswith(f"/{asked}/threads")]
    assert [r.status for r in thread_requests] == [403]  # Discord refused; no thread exists
    assert harness.answers(asked) == []
    history = await harness.history(fake.general_id)
    assert [m["role"] for m in history] == ["user", "assistant"]  # stored once, in the channel
    assert "plan a trip" in str(history[0]["content"])
    assert harness.api.request_count == 1
    [warning] = [r for r in caplog.records if "could not open a thread" in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None


async def test_the_bot_never_answers_itself(harness: Harness) -> None:
    fake = harness.discord
    await harness.command("mode", {"mode": "all"}, user=fake.admin, channel_id=fake.general_id)
    await harness.say(fake.general_id, fake.member, "one message")
    await harness.answer(fake.general_id)  # its own post comes back over the gateway...
    await harness.say(fake.general_id, fake.member, "another message")
    answers = await harness.answer(fake.general_id, 2)  # ...before this, and is ignored
    assert len(answers) == 2 and "another message" in answers[1].content
    assert harness.api.request_count == 2


async def stored_questions(harness: Harness, channel_id: int, wanted: list[str]) -> None:
    """Until the user messages stored for `channel_id` end with exactly `wanted` (deletions
    reach the store through the gateway, a moment after Discord confirms them)."""
    deadline = time.monotonic() + 30
    while True:
        history = await harness.history(channel_id)
        said = [str(m["content"]).rsplit(": ", 1)[-1] for m in history if m["role"] == "user"]
        if said == wanted:
            return
        assert time.monotonic() < deadline, f"stored: {said}, wanted: {wanted}"
        await asyncio.sleep(0.05)


async def test_a_deleted_message_leaves_the_history(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    await harness.say(fake.general_id, fake.member, "keep this", mentions_bot=True)
    await harness.answer(fake.general_id)
    api.reply_text("noted")  # an answer that does not repeat the question
    gone = await harness.say(fake.general_id, fake.member, "oops, secret", mentions_bot=True)
    await harness.answer(fake.general_id, 2)
    await stored_questions(harness, fake.general_id, ["keep this", "oops, secret"])
    fake.delete_user_message(fake.general_id, gone)
    await stored_questions(harness, fake.general_id, ["keep this"])
    history = await harness.history(fake.general_id)
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert "secret" not in str(history)


async def test_the_deleted_message_that_opened_a_thread_leaves_the_threads_history(
    harness: Harness,
) -> None:
    """In threads mode the mention is stored in the thread it opened (the thread takes the
    message's id), while Discord's delete event names the parent channel."""
    fake, api = harness.discord, harness.api
    await harness.command("mode", {"mode": "threads"}, user=fake.admin, channel_id=fake.general_id)
    api.reply_text("noted")
    thread = await harness.say(fake.general_id, fake.member, "my secret plan", mentions_bot=True)
    await harness.answer(thread)
    await stored_questions(harness, thread, ["my secret plan"])
    fake.delete_user_message(fake.general_id, thread)
    await stored_questions(harness, thread, [])
    assert [m["role"] for m in await harness.history(thread)] == ["assistant"]


async def test_a_bulk_delete_removes_each_message(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    await harness.command("mode", {"mode": "all"}, user=fake.admin, channel_id=fake.general_id)
    said = []
    for i, text in enumerate(["first", "spam one", "second", "spam two"]):
        api.reply_text("noted")
        said.append(await harness.say(fake.general_id, fake.member, text))
        await harness.answer(fake.general_id, i + 1)
    await stored_questions(harness, fake.general_id, ["first", "spam one", "second", "spam two"])
    fake.bulk_delete(fake.general_id, [said[1], said[3]])
    await stored_questions(harness, fake.general_id, ["first", "second"])
    assert "spam" not in str(await harness.history(fake.general_id))


async def test_other_bots_are_never_answered(harness: Harness) -> None:
    fake = harness.discord
    await harness.command("mode", {"mode": "all"}, user=fake.admin, channel_id=fake.general_id)
    spoken = await harness.say(fake.general_id, fake.member, "template", mentions_bot=True)
    await harness.answer(fake.general_id)
    event = next(d for e, d in fake.dispatched if e == "MESSAGE_CREATE" and d["id"] == str(spoken))
    from_a_bot = {
        **event,
        "id": str(spoken + 1),
        "content": f"<@{fake.bot_id}> beep boop",
        "author": {**event["author"], "id": "4242", "username": "otherbot", "bot": True},
    }
    fake.dispatch("MESSAGE_CREATE", from_a_bot)
    await only_a_later_mention_is_answered(harness, fake.general_id)
    assert harness.api.request_count == 2
