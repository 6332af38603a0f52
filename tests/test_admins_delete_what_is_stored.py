"""Through Discord: `/delete name` removes a session and everything stored with it (admins;
in a DM its user), `/forget-channel` everything of a channel once its name is typed; bad input
gets one private line and changes nothing; an answer being written meanwhile is shown but not
kept."""

from __future__ import annotations

import threading

import pytest

from bot.engine import NOT_KEPT_NOTE
from tests.discord_harness import Harness
from tests.fakes.discord_gateway import CommandRefused


async def ask(harness: Harness, channel_id: int, text: str, answers_before: int) -> None:
    fake = harness.discord
    await harness.say(channel_id, fake.member, text, mentions_bot=True)
    await harness.answer(channel_id, answers_before + 1)


async def test_an_admin_deletes_a_session_and_a_member_cannot(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    general = fake.general_id
    await ask(harness, general, "kept in default", 0)
    await harness.command("new", {"name": "work"}, user=fake.member, channel_id=general)
    await ask(harness, general, "said in work", 1)
    with pytest.raises(CommandRefused):
        fake.invoke("delete", {"name": "work"}, user=fake.member, channel_id=general)
    choices = await fake.autocomplete("delete", "name", "wo", fake.admin, general)
    assert [c["value"] for c in choices] == ["work"]

    said = await harness.command("delete", {"name": "work"}, user=fake.admin, channel_id=general)
    assert said == (
        "Deleted session work and everything stored with it. Now in a fresh empty session: chat-1"
    )
    listed = await harness.command("list", user=fake.member, channel_id=general)
    assert "work" not in listed and "* chat-1 (0 messages)" in listed
    assert await harness.history(general, "work") == []
    await ask(harness, general, "after the delete", 2)
    assert [m["role"] for m in api.messages_sent()] == ["system", "user"]  # nothing of work

    said = await harness.command("delete", {"name": "default"}, user=fake.admin, channel_id=general)
    assert said == "Deleted session default and everything stored with it."
    assert await harness.history(general, "default") == []
    assert await harness.history(general, "chat-1") != []  # the current session stayed


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"name": "ghost"}, "⚠️ There is no session named 'ghost'; /list shows them."),
        ({"name": "bell\u0007name"}, "⚠️ A session name cannot contain control characters"),
    ],
)
async def test_deleting_what_is_not_there_is_one_private_line_and_changes_nothing(
    harness: Harness, options: dict[str, str], said: str
) -> None:
    fake = harness.discord
    await ask(harness, fake.general_id, "hello", 0)
    before = await harness.command("list", user=fake.admin, channel_id=fake.general_id)
    interaction = fake.invoke("delete", options, user=fake.admin, channel_id=fake.general_id)
    reply = await fake.wait_interaction_reply(interaction)
    assert reply.text.startswith(said) and len(reply.text.splitlines()) == 1
    assert reply.ephemeral
    assert await harness.command("list", user=fake.admin, channel_id=fake.general_id) == before
    assert len(await harness.history(fake.general_id)) == 2


async def test_in_a_dm_the_user_deletes_their_own_session(harness: Harness) -> None:
    fake = harness.discord
    dm = fake.dm_channel(fake.member)
    await ask(harness, dm, "private words", 0)
    said = await harness.command("delete", {"name": "default"}, user=fake.member, channel_id=dm)
    assert said.endswith("Now in a fresh empty session: default")
    assert await harness.history(dm) == []
    status = await harness.command("status", user=fake.member, channel_id=dm)
    assert "Session: default" in status and "Messages: 0" in status


async def test_an_answer_written_while_its_session_is_deleted_is_shown_but_not_kept(
    harness: Harness,
) -> None:
    fake, api = harness.discord, harness.api
    deleted_first = threading.Event()
    api.reply_text("an answer from before the delete", hold=deleted_first)
    fake.user_says(fake.general_id, fake.member, "asked before the delete", mentions_bot=True)
    await fake.wait_for(lambda: api.request_count >= 1, timeout=60, what="the model call")
    said = await harness.command(
        "delete", {"name": "default"}, user=fake.admin, channel_id=fake.general_id
    )
    deleted_first.set()
    assert said.endswith("Now in a fresh empty session: default")
    answer = (await harness.answer(fake.general_id, timeout=60))[-1].content
    assert answer.startswith("an answer from before the delete") and NOT_KEPT_NOTE in answer
    assert await harness.history(fake.general_id) == []


async def test_an_admin_forgets_a_channel_once_its_name_is_typed(harness: Harness) -> None:
    fake = harness.discord
    general = fake.general_id
    await harness.command("mode", {"mode": "all"}, user=fake.admin, channel_id=general)
    await harness.command(
        "persona",
        {"text": "You are a pirate."},
        user=fake.admin,
        channel_id=general,
        subcommand="set",
    )
    await ask(harness, general, "first", 0)
    await harness.command("new", {"name": "work"}, user=fake.member, channel_id=general)
    await ask(harness, general, "second", 1)
    await ask(harness, fake.random_id, "elsewhere", 0)
    with pytest.raises(CommandRefused):
        fake.invoke("forget-channel", {"confirm": "general"}, user=fake.member, channel_id=general)

    interaction = fake.invoke(
        "forget-channel", {"confirm": "random"}, user=fake.admin, channel_id=general
    )
    reply = await fake.wait_interaction_reply(interaction)
    assert reply.ephemeral and reply.text == (
        "⚠️ Nothing was deleted: to confirm, give this place's name, general, exactly."
    )
    assert len(await harness.history(general, "work")) == 2

    said = await harness.command(
        "forget-channel", {"confirm": "#General"}, user=fake.admin, channel_id=general
    )
    assert said == (
        "Deleted everything stored for general: 2 sessions with their messages and settings, "
        "and its /mode and persona. The next message starts a fresh session."
    )
    status = await harness.command("status", user=fake.member, channel_id=general)
    assert "Persona: default" in status
    assert await harness.history(general) == [] and await harness.history(general, "work") == []
    listed = await harness.command("list", user=fake.member, channel_id=general)
    assert listed.startswith("Sessions: (none yet")
    answers = len(harness.answers(general))
    await harness.say(general, fake.member, "not addressed: mentions mode again")
    await ask(harness, general, "addressed", answers)
    assert len(harness.answers(general)) == answers + 1  # only the mention was answered
    assert len(await harness.history(fake.random_id)) == 2  # another channel is untouched


async def test_in_a_dm_the_user_forgets_it_by_typing_dm(harness: Harness) -> None:
    fake = harness.discord
    dm = fake.dm_channel(fake.member)
    await ask(harness, dm, "private words", 0)
    said = await harness.command(
        "forget-channel", {"confirm": "dm"}, user=fake.member, channel_id=dm
    )
    assert said.startswith("Deleted everything stored for dm: 1 session with")
    assert await harness.history(dm) == []
