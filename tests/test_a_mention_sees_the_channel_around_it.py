"""Where the bot answers only when addressed, a mention also shows the model what the channel
said since the bot's last answer there (read from Discord in one request, never stored), the
start of a thread it has not been in, and the message a reply answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bot.commands import Commands
from bot.context import CHANNEL_CONTEXT_HEADER, ChannelContext
from bot.engine import Engine, EngineLimits
from bot.errors import InvalidInput
from bot.model import DedalusModel
from bot.store.base import SessionStore, message_size
from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.conftest import TEST_MODELS
from tests.discord_harness import Harness
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord
from tests.fakes.discord_world import Perm


def speaker(user: dict[str, Any], *, bot: bool = False) -> str:
    return f"[{user['global_name']} (user id {user['id']}{', a bot' if bot else ''})]"


def texts(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part["type"] == "text")


def context_lines(sent: list[dict[str, Any]]) -> list[str]:
    """The lines of the channel-context message ahead of the new message ([] if none)."""
    if len(sent) < 3 or not texts(sent[-2]).startswith(CHANNEL_CONTEXT_HEADER):
        return []
    return texts(sent[-2]).split("\n")[1:]


def nothing_stored_but_turns(history: list[dict[str, Any]]) -> Iterator[str]:
    for message in history:
        assert CHANNEL_CONTEXT_HEADER not in str(message["content"])
        yield message["role"]


async def test_a_mention_sees_the_messages_since_the_last_answer(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    general = fake.general_id
    await harness.say(general, fake.admin, "old chatter")
    await harness.say(general, fake.member, "first question", mentions_bot=True)
    await harness.answer(general)
    assert context_lines(api.messages_sent()) == [f"{speaker(fake.admin)}: old chatter"]

    await harness.say(general, fake.admin, "the build fails on line 3")
    await harness.say(general, fake.other_bot, "CI: build 12 failed")
    await harness.say(general, fake.member, f"same here, <@{fake.admin_id}>")
    await harness.say(general, fake.member, "what do you think?", mentions_bot=True)
    await harness.answer(general, 2)

    sent = api.messages_sent()
    assert context_lines(sent) == [
        f"{speaker(fake.admin)}: the build fails on line 3",
        f"{speaker(fake.other_bot, bot=True)}: CI: build 12 failed",
        f"{speaker(fake.member)}: same here, @{fake.admin['global_name']}",
    ]
    assert sent[-1]["content"] == f"{speaker(fake.member)}: what do you think?"
    assert "first question" in str(sent[1:-2])  # the session's history, sent once
    assert "old chatter" not in str(sent)  # before the last answer: already seen
    # Read from Discord, once per mention; the session keeps only the turns.
    assert [r.query["limit"] for r in fake.history_reads(general)] == ["50", "50"]
    history = await harness.history(general)
    assert list(nothing_stored_but_turns(history)) == ["user", "assistant"] * 2


async def test_a_thread_first_seen_midway_shows_its_start(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    started = await harness.say(fake.general_id, fake.member, "our deploy broke at noon")
    thread = fake.create_thread(fake.general_id, "deploy", from_message=started)
    await harness.say(thread, fake.admin, "the logs say out of memory")
    await harness.restart()  # nothing cached: the thread's own first message leads to its start
    await harness.say(thread, fake.member, "what now?", mentions_bot=True)
    [reply] = await harness.answer(thread)
    assert "what now?" in reply.content

    assert context_lines(api.messages_sent()) == [
        f"(the message this thread was started from) {speaker(fake.member)}: "
        "our deploy broke at noon",
        f"{speaker(fake.admin)}: the logs say out of memory",
    ]
    assert len(fake.history_reads(thread)) == 1
    assert [m["role"] for m in await harness.history(thread)] == ["user", "assistant"]

    await harness.say(thread, fake.admin, "raised the limit")
    await harness.say(thread, fake.member, "and now?", mentions_bot=True)
    await harness.answer(thread, 2)
    assert context_lines(api.messages_sent()) == [f"{speaker(fake.admin)}: raised the limit"]


async def test_a_thread_longer_than_the_page_still_shows_its_start(harness: Harness) -> None:
    """The page holds only the newest messages; the starter message comes from what the bot
    saw in the parent channel, without a second request."""
    harness.channel_context_messages = 2
    await harness.restart()
    fake, api = harness.discord, harness.api
    started = await harness.say(fake.general_id, fake.member, "the topic")
    thread = fake.create_thread(fake.general_id, "topic", from_message=started)
    for i in range(4):
        await harness.say(thread, fake.admin, f"remark {i}")
    asked = await harness.say(thread, fake.member, "sum it up", mentions_bot=True)
    await harness.answer(thread)
    assert context_lines(api.messages_sent()) == [
        f"(the message this thread was started from) {speaker(fake.member)}: the topic",
        f"{speaker(fake.admin)}: remark 2",
        f"{speaker(fake.admin)}: remark 3",
    ]
    reads = [
        (r.path, r.query) for r in fake.requests if r.method == "GET" and "/channels/" in r.path
    ]
    assert reads == [(f"/api/v10/channels/{thread}/messages", {"limit": "2", "before": str(asked)})]


async def test_a_reply_to_an_old_message_shows_it(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    general = fake.general_id
    old = await harness.say(general, fake.member, "passwords expire every 90 days")
    await harness.say(general, fake.member, "hello", mentions_bot=True)
    await harness.answer(general)
    await harness.say(general, fake.admin, "is this still true?", reply_to=old, mentions_bot=True)
    await harness.answer(general, 2)
    assert context_lines(api.messages_sent()) == [
        f"(the message being replied to) {speaker(fake.member)}: passwords expire every 90 days"
    ]
    assert len(fake.history_reads(general)) == 2  # the event carried it: no extra request
    assert not [r for r in fake.requests if r.method == "GET" and f"/messages/{old}" in r.path]


async def test_images_and_files_in_the_channel_are_shown_as_in_any_message(
    harness: Harness,
) -> None:
    fake, api = harness.discord, harness.api
    files = [
        fake.add_attachment("error.png", b"\x89PNG fake", "image/png"),
        fake.add_attachment("trace.txt", b"Traceback: boom", "text/plain"),
    ]
    await harness.say(fake.general_id, fake.admin, "look", attachments=files)
    await harness.say(fake.general_id, fake.member, "any idea?", mentions_bot=True)
    await harness.answer(fake.general_id)
    [header_and_text, image, *rest] = api.messages_sent()[-2]["content"]
    assert rest == []
    assert header_and_text["text"].startswith(CHANNEL_CONTEXT_HEADER)
    assert "[file trace.txt]\n```\nTraceback: boom\n```" in header_and_text["text"]
    assert image == {"type": "image_url", "image_url": {"url": files[0]["url"]}}


async def test_switched_off_the_channel_is_not_read(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    general = fake.general_id
    said = await harness.command("context", {"state": "off"}, user=fake.admin, channel_id=general)
    assert said.startswith("Channel context: off")
    await harness.say(general, fake.admin, "chatter the bot must not see")
    await harness.say(general, fake.member, "hello", mentions_bot=True)
    await harness.answer(general)
    assert fake.history_reads() == []
    assert [m["role"] for m in api.messages_sent()] == ["system", "user"]

    await harness.command("context", {"state": "on"}, user=fake.admin, channel_id=general)
    await harness.say(general, fake.admin, "now it may")
    await harness.say(general, fake.member, "and now?", mentions_bot=True)
    await harness.answer(general, 2)
    assert context_lines(api.messages_sent()) == [f"{speaker(fake.admin)}: now it may"]


async def test_a_thread_follows_its_channels_switch(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    await harness.command("context", {"state": "off"}, user=fake.admin, channel_id=fake.general_id)
    thread = fake.create_thread(fake.general_id, "side talk")
    await harness.say(thread, fake.admin, "private chatter")
    await harness.say(thread, fake.member, "hi", mentions_bot=True)
    await harness.answer(thread)
    assert fake.history_reads() == []
    assert "private chatter" not in str(api.messages_sent())


async def test_a_bad_switch_value_is_refused_and_changes_nothing(store: SessionStore) -> None:
    commands = Commands(store, TEST_MODELS, TEST_MODELS[0])
    try:
        await commands.set_channel_context("discord:1", "maybe")
    except InvalidInput as error:
        assert str(error) == "Unknown choice 'maybe'. Choose on or off."
    else:
        raise AssertionError("accepted 'maybe'")
    assert await commands.channel_context("discord:1") is True
    await commands.set_channel_context("discord:1", " OFF ")
    assert await commands.channel_context("discord:1") is False
    assert await commands.channel_context("discord:2", parent="discord:1") is False
    await commands.set_channel_context("discord:2", "on")
    assert await commands.channel_context("discord:2", parent="discord:1") is True


async def test_no_read_in_all_mode_or_in_the_bots_own_threads(harness: Harness) -> None:
    fake = harness.discord
    await harness.command("mode", {"mode": "all"}, user=fake.admin, channel_id=fake.random_id)
    await harness.say(fake.random_id, fake.admin, "every message is answered here")
    await harness.answer(fake.random_id)
    assert fake.history_reads() == []

    await harness.command("mode", {"mode": "threads"}, user=fake.admin, channel_id=fake.general_id)
    await harness.say(fake.general_id, fake.admin, "context for the thread")
    thread = await harness.say(fake.general_id, fake.member, "plan it", mentions_bot=True)
    await harness.answer(thread)
    # The answer's request streams (the bot also asks the model for the thread's title).
    sent = [r["messages"] for r in harness.api.requests if r.get("stream")][-1]
    assert context_lines(sent) == [f"{speaker(fake.admin)}: context for the thread"]
    await harness.say(thread, fake.member, "go on")
    await harness.answer(thread, 2)
    assert [r.path for r in fake.history_reads()] == [
        f"/api/v10/channels/{fake.general_id}/messages"
    ]


async def test_without_read_message_history_the_bot_answers_without_it(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    fake.set_permission_overwrite(fake.general_id, fake.bot_id, deny=Perm.READ_MESSAGE_HISTORY)
    await harness.say(fake.general_id, fake.admin, "hidden chatter")
    await harness.say(fake.general_id, fake.member, "hello", mentions_bot=True)
    await harness.answer(fake.general_id)
    assert len(fake.history_reads()) == 1
    assert [m["role"] for m in api.messages_sent()] == ["system", "user"]


async def test_the_channel_context_is_counted_in_the_budget(store: SessionStore) -> None:
    """History, channel context and the new message together stay within the budget: the
    context takes at most its share (its newest messages), and history makes room for it."""
    budget = 6000
    with FakeDedalusAPI() as api:
        model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
        # No summaries: the history sent is then only what the budget leaves it.
        limits = EngineLimits(system_prompt="S", budget_bytes=budget, summaries=False)
        engine = Engine(store, model, limits)
        for i in range(20):
            api.reply_text(f"answer {i}")
            await engine.reply("chan", {"role": "user", "content": f"turn {i} " + "x" * 200})
        alone = api.messages_sent()

        chatter = [
            {"role": "user", "content": f"[Eve (user id 7)]: chat {i} " + "y" * 100}
            for i in range(30)
        ]

        async def around(scope: str, answered: int | None) -> ChannelContext:
            return ChannelContext(recent=chatter)

        api.reply_text("last answer")
        await engine.reply("chan", {"role": "user", "content": "what now?"}, around=around)
        sent = api.messages_sent()
        await model.close()
    assert sum(map(message_size, sent)) <= budget
    block = texts(sent[-2])
    assert block.startswith(CHANNEL_CONTEXT_HEADER)
    assert message_size(sent[-2]) <= budget // 4
    assert "chat 29 " in block and "chat 0 " not in block
    assert len(sent) < len(alone)  # older history made room for it
    stored = await store.read_history("chan", "default")
    assert len(stored) == 42 and "chat" not in str(stored)


async def test_two_processes_read_the_channel_once_per_mention(
    redis_url: str, tmp_path: Path
) -> None:
    """Both processes see every mention; only the one that answers it reads the channel."""
    with FakeDiscord(rate_limit=1000) as fake, FakeDedalusAPI() as api:
        env = bot_environment(fake, api, redis_url, LOG_LEVEL="DEBUG")
        bots = [BotProcess(env, tmp_path / f"bot{i}.log") for i in range(2)]
        try:
            wait_connected(bots)
            mentions = []
            for i in range(3):
                fake.user_says(fake.general_id, fake.admin, f"chatter {i}")
                mentions.append(
                    fake.user_says(fake.general_id, fake.member, f"ask {i}", mentions_bot=True)
                )
                await fake.wait_bot_messages(fake.general_id, i + 1, timeout=60)

            def all_given_up() -> bool:
                logged = "".join(bot.text() for bot in bots)
                return all(f"message {m} is answered elsewhere" in logged for m in mentions)

            await fake.wait_for(all_given_up, 60, what="the other process giving each one up")
            # Each mention read once (the start-up catch-up may read the channel too, from
            # its newest message down: no `before`).
            around = [r.query["before"] for r in fake.history_reads() if "before" in r.query]
            assert around == [str(m) for m in mentions]
            assert [context_lines(api.messages_sent(i)) for i in range(3)] == [
                [f"{speaker(fake.admin)}: chatter {i}"] for i in range(3)
            ]
        finally:
            for bot in bots:
                bot.stop()
