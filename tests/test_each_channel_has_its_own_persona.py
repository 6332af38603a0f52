"""`/persona`: a channel's own system prompt. Threads inherit their channel's unless they set
their own, DMs use the default unless the user sets one, `/status` says which applies, and
the model is sent the persona (with the note on how the chat reaches it) instead of the
default prompt, within the same context budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.commands import PERSONA_MAX_CHARS, Commands, PersonaInEffect
from bot.config import DEFAULT_SYSTEM_PROMPT, PERSONA_NOTE
from bot.discord_bot.scopes import scope_for
from bot.store.base import StorePolicy, message_size
from bot.store.redis import RedisStore
from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.conftest import TEST_MODELS
from tests.discord_harness import SYSTEM, Harness
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import CommandRefused, FakeDiscord

PIRATE = "You are Captain Hook, a pirate. Answer in pirate speak."
LIBRARIAN = "You are a quiet librarian. Answer in one sentence."
BARD = "You are a bard of the dungeon. Answer in verse."


async def persona(harness: Harness, action: str, channel_id: int, **options: Any) -> str:
    user = options.pop("user", harness.discord.admin)
    return await harness.command(
        "persona", options or None, user=user, channel_id=channel_id, subcommand=action
    )


async def system_prompt_of_answer(
    harness: Harness, channel_id: int, text: str, *, mention: bool = True
) -> str:
    """The system prompt the model was sent to answer `text` in the channel."""
    fake = harness.discord
    before = len(harness.answers(channel_id))
    await harness.say(channel_id, fake.member, text, mentions_bot=mention)
    await harness.answer(channel_id, before + 1)
    sent = harness.api.messages_sent()
    assert text in str(sent[-1]["content"])
    assert sent[0]["role"] == "system"
    return str(sent[0]["content"])


def with_note(persona_text: str) -> str:
    return f"{persona_text}\n\n{PERSONA_NOTE}"


def text_input(form: dict[str, Any]) -> dict[str, Any]:
    """The form's one text input, wherever it sits (in a label, or an action row)."""
    found: dict[str, Any]
    [found] = [
        inner
        for outer in form["components"]
        for inner in [outer.get("component"), *(outer.get("components") or [])]
        if inner and inner["type"] == 4
    ]
    return found


async def open_form(harness: Harness, channel_id: int) -> tuple[int, dict[str, Any]]:
    """`/persona set` without text: the form the bot answers with."""
    fake = harness.discord
    opened = fake.invoke("persona", user=fake.admin, channel_id=channel_id, subcommand="set")
    form = await fake.wait_for(lambda: fake.modal(opened), what="the /persona form")
    return opened, form


async def test_each_channel_sends_its_own_persona(harness: Harness) -> None:
    fake = harness.discord
    interaction = fake.invoke(
        "persona", {"text": PIRATE}, user=fake.admin, channel_id=fake.general_id, subcommand="set"
    )
    reply = await fake.wait_interaction_reply(interaction)
    assert reply.text.startswith("Persona set (") and "Captain Hook" in reply.text
    assert not reply.ephemeral  # the channel sees its assistant change

    assert await system_prompt_of_answer(harness, fake.general_id, "ahoy?") == with_note(PIRATE)
    assert "square brackets" in PERSONA_NOTE  # how speakers are shown stays explained
    assert await system_prompt_of_answer(harness, fake.random_id, "hello?") == SYSTEM

    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert "Persona (this channel): You are Captain Hook" in status
    status = await harness.command("status", user=fake.member, channel_id=fake.random_id)
    assert "Persona: default" in status

    said = await persona(harness, "clear", fake.general_id)
    assert said == "Persona cleared; the next message here uses the default."
    assert await system_prompt_of_answer(harness, fake.general_id, "still?") == SYSTEM


async def test_a_thread_inherits_its_channels_persona_unless_it_has_its_own(
    harness: Harness,
) -> None:
    fake = harness.discord
    thread = fake.create_thread(fake.general_id, "questions")
    await persona(harness, "set", fake.general_id, text=PIRATE)
    prompt = await system_prompt_of_answer(harness, thread, "in the thread")
    assert prompt == with_note(PIRATE)
    status = await harness.command("status", user=fake.member, channel_id=thread)
    assert f"Persona (parent channel <#{fake.general_id}>): You are Captain Hook" in status

    await persona(harness, "set", thread, text=LIBRARIAN)
    assert await system_prompt_of_answer(harness, thread, "own") == with_note(LIBRARIAN)
    assert await system_prompt_of_answer(harness, fake.general_id, "x") == with_note(PIRATE)
    shown = await persona(harness, "show", thread)
    assert shown == f"Persona from this thread ({len(LIBRARIAN)} characters):\n{LIBRARIAN}"

    said = await persona(harness, "clear", thread)
    assert said == (
        "Persona cleared; the next message here uses the persona of the parent channel "
        f"<#{fake.general_id}>."
    )
    assert await system_prompt_of_answer(harness, thread, "back") == with_note(PIRATE)
    await persona(harness, "clear", fake.general_id)
    assert await system_prompt_of_answer(harness, thread, "plain") == SYSTEM
    status = await harness.command("status", user=fake.member, channel_id=thread)
    assert "Persona: default" in status


async def test_a_thread_the_bot_opens_uses_its_channels_persona(harness: Harness) -> None:
    fake = harness.discord
    await harness.command("mode", {"mode": "threads"}, user=fake.admin, channel_id=fake.random_id)
    await persona(harness, "set", fake.random_id, text=BARD)
    await harness.say(fake.random_id, fake.member, "a quest!", mentions_bot=True)
    opened = await fake.wait_for(
        lambda: [d for e, d in fake.dispatched if e == "THREAD_CREATE"], what="a thread"
    )
    await harness.answer(int(opened[0]["id"]))
    answered = harness.api.messages_sent(0)  # the answer; the thread's title was asked next
    assert answered[0]["content"] == with_note(BARD)


async def test_in_a_dm_the_user_sets_their_own_persona(harness: Harness) -> None:
    fake = harness.discord
    dm, other_dm = fake.dm_channel(fake.member), fake.dm_channel(fake.admin)
    said = await persona(harness, "set", dm, text=BARD, user=fake.member)
    assert said.startswith("Persona set (")
    assert await system_prompt_of_answer(harness, dm, "hi", mention=False) == with_note(BARD)
    status = await harness.command("status", user=fake.member, channel_id=dm)
    assert "Persona (this DM): You are a bard" in status
    others = await harness.command("status", user=fake.admin, channel_id=other_dm)
    assert "Persona: default" in others
    await persona(harness, "clear", dm, user=fake.member)
    assert await system_prompt_of_answer(harness, dm, "again", mention=False) == SYSTEM


async def test_a_form_keeps_line_breaks_and_holds_the_persona_to_edit(harness: Harness) -> None:
    fake = harness.discord
    opened, form = await open_form(harness, fake.general_id)
    assert fake.interaction_reply(opened).response_types == [9]  # the form is the answer
    field = text_input(form)
    assert (field["style"], field["max_length"]) == (2, PERSONA_MAX_CHARS)  # a paragraph
    assert not field.get("value")  # nothing to edit yet
    lines = "You are a dungeon master.\nDescribe each room.\n\tThen ask what they do."
    submitted = fake.submit_modal(opened, {field["custom_id"]: lines})
    reply = await fake.wait_interaction_reply(submitted)
    assert reply.text.startswith("Persona set (") and not reply.ephemeral
    assert await system_prompt_of_answer(harness, fake.general_id, "go") == with_note(lines)

    opened, form = await open_form(harness, fake.general_id)
    field = text_input(form)
    assert field["value"] == lines  # the persona to edit
    with pytest.raises(CommandRefused):  # Discord's client refuses it
        fake.submit_modal(opened, {field["custom_id"]: "x" * (PERSONA_MAX_CHARS + 1)})
    submitted = fake.submit_modal(opened, {field["custom_id"]: "A bell\x07 rings."})
    reply = await fake.wait_interaction_reply(submitted)
    assert reply.text == (
        "⚠️ A persona cannot contain control characters (line breaks and tabs are fine). "
        "Nothing was changed."
    )
    assert reply.ephemeral
    assert await system_prompt_of_answer(harness, fake.general_id, "on") == with_note(lines)


@pytest.mark.parametrize("action", ["set", "show", "clear"])
async def test_a_member_cannot_use_persona_in_a_server(harness: Harness, action: str) -> None:
    fake = harness.discord
    options = {"text": PIRATE} if action == "set" else None
    with pytest.raises(CommandRefused):
        fake.invoke(
            "persona", options, user=fake.member, channel_id=fake.general_id, subcommand=action
        )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("   ", "A persona cannot be empty; /persona clear returns to the default."),
        (
            "You are\x07 a bell.",
            "A persona cannot contain control characters (line breaks and tabs are fine). "
            "Nothing was changed.",
        ),
        (
            "You are\x1b[31m red.",
            "A persona cannot contain control characters (line breaks and tabs are fine). "
            "Nothing was changed.",
        ),
    ],
)
async def test_bad_persona_gets_one_line_and_changes_nothing(
    harness: Harness, text: str, reason: str
) -> None:
    fake = harness.discord
    await persona(harness, "set", fake.general_id, text=PIRATE)
    interaction = fake.invoke(
        "persona", {"text": text}, user=fake.admin, channel_id=fake.general_id, subcommand="set"
    )
    reply = await fake.wait_interaction_reply(interaction)
    assert reply.text == f"⚠️ {reason}" and reply.ephemeral
    assert await system_prompt_of_answer(harness, fake.general_id, "hm") == with_note(PIRATE)


async def test_discord_refuses_a_persona_over_the_limit(harness: Harness) -> None:
    fake = harness.discord
    [command] = [c for c in fake.commands() if c["name"] == "persona"]
    [set_command] = [o for o in command["options"] if o["name"] == "set"]
    [text] = set_command["options"]
    assert (text["min_length"], text["max_length"]) == (1, PERSONA_MAX_CHARS)
    with pytest.raises(CommandRefused):
        fake.invoke(
            "persona",
            {"text": "x" * (PERSONA_MAX_CHARS + 1)},
            user=fake.admin,
            channel_id=fake.general_id,
            subcommand="set",
        )
    said = await persona(harness, "set", fake.general_id, text="y" * PERSONA_MAX_CHARS)
    assert said.startswith(f"Persona set ({PERSONA_MAX_CHARS} characters)")


async def test_show_is_private_and_pings_nobody(harness: Harness) -> None:
    fake = harness.discord
    loud = f"You greet @everyone and <@{fake.member['id']}> and <@&{fake.guild_id}> loudly."
    await persona(harness, "set", fake.general_id, text=loud)
    interaction = fake.invoke(
        "persona", user=fake.admin, channel_id=fake.general_id, subcommand="show"
    )
    reply = await fake.wait_interaction_reply(interaction)
    assert reply.ephemeral and loud in reply.text
    for message in reply.messages:
        assert message.allowed_mentions is not None
        assert message.allowed_mentions.get("parse") == []
        assert not message.allowed_mentions.get("users")
        assert not message.allowed_mentions.get("roles")


async def test_the_persona_counts_in_the_context_budget(harness: Harness) -> None:
    """A long persona leaves less room for history: what is sent stays within the budget."""
    fake = harness.discord
    harness.budget_bytes = 4_000
    await harness.restart()
    for i in range(12):
        await system_prompt_of_answer(harness, fake.general_id, f"message {i:02} " + "z" * 200)
    without = harness.api.messages_sent()
    long_persona = "You are thorough. " * 140  # about 2,500 characters
    await persona(harness, "set", fake.general_id, text=long_persona)
    await system_prompt_of_answer(harness, fake.general_id, "and now?")
    sent = harness.api.messages_sent()
    assert sent[0]["content"] == with_note(long_persona.strip())
    assert sum(message_size(m) for m in sent) <= harness.budget_bytes
    assert 1 < len(sent) < len(without)  # history made room for it


async def test_a_change_made_in_one_process_counts_in_anothers_next_turn(
    redis_url: str, tmp_path: Path
) -> None:
    """Two bot processes over one Redis, and a third (this test) changing personas through
    the same commands: every next turn, whichever process answers it, uses the newest."""
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
    elsewhere = Commands(store, TEST_MODELS, TEST_MODELS[0])
    with FakeDiscord(rate_limit=1000) as fake, FakeDedalusAPI() as api:
        env = bot_environment(fake, api, redis_url, LOG_LEVEL="DEBUG")
        bots = [BotProcess(env, tmp_path / f"bot{i}.log") for i in range(2)]
        try:
            wait_connected(bots)
            general, thread = fake.general_id, fake.create_thread(fake.general_id, "t")
            answered = 0

            async def prompt_for(channel_id: int, text: str) -> str:
                nonlocal answered
                answered += 1
                fake.user_says(channel_id, fake.member, text, mentions_bot=True)
                await fake.wait_for(
                    lambda: api.request_count >= answered, what=f"the model asked for {text!r}"
                )
                sent = api.messages_sent()
                assert text in str(sent[-1]["content"])
                return str(sent[0]["content"])

            assert await prompt_for(general, "one") == DEFAULT_SYSTEM_PROMPT
            assert await prompt_for(thread, "two") == DEFAULT_SYSTEM_PROMPT
            await elsewhere.set_persona(scope_for(general), PIRATE)
            assert await prompt_for(general, "three") == with_note(PIRATE)
            assert await prompt_for(thread, "four") == with_note(PIRATE)  # inherited
            await elsewhere.set_persona(scope_for(general), LIBRARIAN)
            assert await prompt_for(thread, "five") == with_note(LIBRARIAN)
            assert await prompt_for(general, "six") == with_note(LIBRARIAN)

            set_bard = fake.invoke(
                "persona", {"text": BARD}, user=fake.admin, channel_id=thread, subcommand="set"
            )
            await fake.wait_interaction_reply(set_bard, timeout=30)
            assert await elsewhere.persona_in_effect(scope_for(thread)) == PersonaInEffect(
                BARD, "this place"
            )
            assert await prompt_for(thread, "seven") == with_note(BARD)
            clear = fake.invoke("persona", user=fake.admin, channel_id=general, subcommand="clear")
            await fake.wait_interaction_reply(clear, timeout=30)
            assert await prompt_for(general, "eight") == DEFAULT_SYSTEM_PROMPT
            assert await prompt_for(thread, "nine") == with_note(BARD)

            opened = fake.invoke("persona", user=fake.admin, channel_id=general, subcommand="set")
            form = await fake.wait_for(lambda: fake.modal(opened), 30, what="the form")
            field = text_input(form)
            submitted = fake.submit_modal(opened, {field["custom_id"]: "Line one.\nLine two."})
            reply = await fake.wait_interaction_reply(submitted, timeout=30)
            assert reply.text.startswith("Persona set (")  # by the process that sent the form
            assert await prompt_for(general, "ten") == with_note("Line one.\nLine two.")
            shown = [r.status for r in fake.requests if f"/interactions/{opened}/" in r.path]
            assert sorted(shown) == [200, 400]  # one form: the other process was refused
            logged = "".join(bot.text() for bot in bots)
            assert "Traceback" not in logged and " ERROR " not in logged, logged
        finally:
            for bot in bots:
                bot.stop()
    await store.close()
