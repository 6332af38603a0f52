"""A thread the bot opens is renamed, after its first answer, to a short title the model
writes: once, by one process, never over a name a person gave it; a refused rename is one
warning line and changes nothing else."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from bot.titles import TITLE_OPTION, TITLE_PROMPT, TITLED, clean_title
from tests.conftest import TEST_MODELS
from tests.discord_harness import Harness

SCRIPTED_TITLE = 'Title: "Trip to <@123> Lisbon\n@everyone <#456> planning <@&789>"'
CLEAN_TITLE = "Trip to Lisbon planning"


async def open_thread(harness: Harness) -> int:
    fake = harness.discord
    said = await harness.command(
        "new", {"thread": True}, user=fake.member, channel_id=fake.general_id
    )
    return int(said.split("<#")[1].split(">")[0])


def renames(harness: Harness, thread: int) -> list[object]:
    path = f"/api/v10/channels/{thread}"
    return [r.body for r in harness.discord.requests if r.method == "PATCH" and r.path == path]


async def test_a_thread_opened_by_new_is_titled_once_after_its_first_answer(
    harness: Harness,
) -> None:
    fake, api = harness.discord, harness.api
    thread = await open_thread(harness)
    assert fake.thread_names(thread) == ["Chat with Bob Member"]
    api.reply_text("Lisbon in May is lovely.")
    api.reply_text(SCRIPTED_TITLE)
    await harness.say(thread, fake.member, "help me plan a trip to Lisbon")
    [answer] = await harness.answer(thread)
    assert answer.content == "Lisbon in May is lovely."
    assert fake.thread_names(thread) == ["Chat with Bob Member", CLEAN_TITLE]
    assert renames(harness, thread) == [{"name": CLEAN_TITLE}]

    title_call = api.requests[1]  # one small call, to the session's model, without tools
    assert title_call["messages"][0] == {"role": "system", "content": TITLE_PROMPT}
    assert "help me plan a trip to Lisbon" in title_call["messages"][1]["content"]
    assert "Lisbon in May is lovely." in title_call["messages"][1]["content"]
    assert title_call["model"] in (TEST_MODELS[0], [TEST_MODELS[0]])
    assert not title_call.get("mcp_servers")
    assert len(await harness.history(thread)) == 2  # the title is not part of the session
    assert harness.store is not None  # recorded for every process, and for any retry
    assert await harness.store.scope_option(f"discord:{thread}", TITLE_OPTION) == TITLED

    await harness.say(thread, fake.member, "and what about Porto?")
    await harness.answer(thread, 2)
    await harness.restart()  # another process, which knows nothing of this one's memory
    await harness.say(thread, fake.member, "and Faro?")
    await harness.answer(thread, 3)
    assert api.request_count == 4  # three answers, one title
    assert fake.thread_names(thread) == ["Chat with Bob Member", CLEAN_TITLE]


async def test_a_thread_opened_for_a_mention_is_titled_after_its_answer(
    harness: Harness,
) -> None:
    fake, api = harness.discord, harness.api
    await harness.command("mode", {"mode": "threads"}, user=fake.admin, channel_id=fake.general_id)
    api.reply_text("Pack light.")
    api.reply_text("Packing for a week")
    thread = await harness.say(
        fake.general_id, fake.member, "what should I pack\nfor a week away?", mentions_bot=True
    )
    await harness.answer(thread)
    assert fake.thread_names(thread) == ["what should I pack", "Packing for a week"]


@pytest.mark.parametrize("when", ["before the first answer", "while the title is written"])
async def test_a_name_a_person_gave_the_thread_is_never_overwritten(
    harness: Harness, when: str
) -> None:
    fake, api = harness.discord, harness.api
    thread = await open_thread(harness)
    title_may_come = threading.Event()
    api.reply_text("An answer.")
    api.reply_text("A model title", hold=title_may_come)
    if when == "before the first answer":
        fake.rename_thread(thread, "Bob's corner", by=fake.admin)
        title_may_come.set()
    await harness.say(thread, fake.member, "hello")
    if when == "while the title is written":
        await fake.wait_for(lambda: api.request_count == 2, what="the title being written")
        fake.rename_thread(thread, "Bob's corner", by=fake.admin)
        title_may_come.set()
    await harness.answer(thread)
    assert fake.thread_names(thread) == ["Chat with Bob Member", "Bob's corner"]
    assert renames(harness, thread) == []
    if when == "before the first answer":  # known from the gateway: not even a title call
        assert api.request_count == 1
    assert harness.store is not None
    assert await harness.store.scope_option(f"discord:{thread}", TITLE_OPTION) == TITLED


@pytest.mark.parametrize(
    ("status", "code"),
    [(403, 50013), (404, 10003), (429, 0)],
    ids=["missing-permissions", "unknown-channel", "rate-limited"],
)
async def test_a_refused_rename_is_one_warning_and_changes_nothing_else(
    harness: Harness, caplog: pytest.LogCaptureFixture, status: int, code: int
) -> None:
    fake, api = harness.discord, harness.api
    thread = await open_thread(harness)
    fake.refuse_next("PATCH", f"/channels/{thread}", status, code)
    api.reply_text("An answer.")
    api.reply_text("A fine title")
    await harness.say(thread, fake.member, "hello")
    [answer] = await harness.answer(thread)
    assert answer.content == "An answer."
    assert fake.thread_names(thread) == ["Chat with Bob Member"]
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.getMessage(), r.exc_info) for r in lines] == [
        (f"could not rename thread {thread}: HTTP {status} (code {code})", None)
    ]
    assert len(await harness.history(thread)) == 2
    await harness.say(thread, fake.member, "again")  # the thread keeps answering, untitled
    await harness.answer(thread, 2)
    assert api.request_count == 3 and fake.thread_names(thread) == ["Chat with Bob Member"]


async def test_the_answer_is_not_held_up_by_its_title(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    thread = await open_thread(harness)
    title_may_come = threading.Event()
    api.reply_text("The whole answer.")
    api.reply_text("A late title", hold=title_may_come)
    await harness.say(thread, fake.member, "hello")
    try:
        await fake.wait_for(
            lambda: (
                [m.content for m in harness.answers(thread)] == ["The whole answer."]
                and api.request_count == 2
            ),
            what="the answer posted while its title is still being written",
        )
        assert fake.thread_names(thread) == ["Chat with Bob Member"]
    finally:
        title_may_come.set()
    await harness.settled()
    assert fake.thread_names(thread) == ["Chat with Bob Member", "A late title"]


async def test_a_shutdown_cancels_a_title_still_being_written(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    thread = await open_thread(harness)
    never = threading.Event()
    api.reply_text("An answer.")
    api.reply_text("Too late", hold=never)
    await harness.say(thread, fake.member, "hello")
    await fake.wait_for(lambda: api.request_count == 2, what="the title being written")
    bot = harness.bot
    assert bot is not None
    await asyncio.wait_for(bot.shut_down(0.2), 30)
    pending = [t for t in asyncio.all_tasks() if t.get_name().startswith("title thread")]
    assert [t for t in pending if not t.done()] == []
    never.set()
    assert fake.thread_names(thread) == ["Chat with Bob Member"]


@pytest.mark.parametrize(
    ("written", "title"),
    [
        (SCRIPTED_TITLE, CLEAN_TITLE),
        ("'Bob's \u201cbig\u201d move'", "Bob's big move"),
        ("<@1> @here", ""),
        ("word " * 40, ("word " * 20).strip()),
        ("x" * 150, "x" * 100),
    ],
)
def test_a_title_is_one_line_without_mentions_or_quotes_within_the_limit(
    written: str, title: str
) -> None:
    assert clean_title(written, 100) == title


async def test_a_titles_tokens_count_in_the_threads_totals(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    thread = await open_thread(harness)
    api.reply_text("Lisbon in May is lovely.")
    api.reply_text(SCRIPTED_TITLE)
    await harness.say(thread, fake.member, "help me plan a trip to Lisbon")
    await harness.answer(thread)
    await fake.wait_for(lambda: fake.thread_names(thread)[-1] == CLEAN_TITLE, what="the title")
    answer, title = harness.api.reported_usage
    tokens_in = answer["prompt_tokens"] + title["prompt_tokens"]
    tokens_out = answer["completion_tokens"] + title["completion_tokens"]
    status = await harness.command("status", user=fake.member, channel_id=thread)
    assert f"Tokens: {tokens_in:,} in, {tokens_out:,} out" in status.splitlines()
    total = tokens_in + tokens_out
    usage = await harness.command("usage", user=fake.admin, channel_id=fake.general_id)
    assert f"Today: {total:,} tokens ({tokens_in:,} in, {tokens_out:,} out)" in usage
    assert f"1. <@{fake.member_id}>: {total:,} tokens" in usage.splitlines()  # who asked
