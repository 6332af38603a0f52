"""The slash commands change what the next model call receives; admin-only ones are
registered so Discord refuses them to members; bad input changes nothing."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import discord
import pytest

from tests.conftest import TEST_MODELS, RedisServer
from tests.discord_harness import Harness
from tests.fakes.discord_gateway import CommandRefused

ADMIN_ONLY = {"clear", "compact", "model", "mcp", "mode", "persona", "delete", "forget-channel"}
ADMIN_ONLY |= {"usage", "context"}
COMMANDS = {"new", "list", "load", "clear", "compact", "status", "export", "model", "mcp"}
COMMANDS |= {"mode", "persona", "retry", "undo", "delete", "forget-channel", "usage", "context"}


async def ask(harness: Harness, text: str, answers_before: int) -> None:
    fake = harness.discord
    await harness.say(fake.general_id, fake.member, text, mentions_bot=True)
    await harness.answer(fake.general_id, answers_before + 1)


async def test_commands_are_registered_with_their_permissions(harness: Harness) -> None:
    registered = {c["name"]: c for c in harness.discord.commands()}
    assert set(registered) == COMMANDS
    manage_guild = str(discord.Permissions(manage_guild=True).value)
    for name, command in registered.items():
        expected = manage_guild if name in ADMIN_ONLY else None
        assert command.get("default_member_permissions") == expected, name


async def test_a_development_guild_gets_the_commands_at_once(harness: Harness) -> None:
    fake = harness.discord
    harness.dev_guild_id = fake.guild_id
    await harness.restart()
    in_guild = {c["name"] for c in fake.commands(fake.guild_id)}
    assert in_guild == COMMANDS
    said = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert "Session: default" in said


@pytest.mark.parametrize(
    ("name", "options", "subcommand"),
    [
        ("clear", None, None),
        ("compact", None, None),
        ("model", {"name": "2"}, None),
        ("mcp", {"server": "acme/x"}, "add"),
        ("mode", {"mode": "all"}, None),
        ("usage", None, None),
        ("context", {"state": "off"}, None),
    ],
)
async def test_a_member_cannot_use_admin_commands(
    harness: Harness, name: str, options: dict[str, str] | None, subcommand: str | None
) -> None:
    fake = harness.discord
    with pytest.raises(CommandRefused):
        fake.invoke(
            name, options, user=fake.member, channel_id=fake.general_id, subcommand=subcommand
        )


async def test_model_and_mcp_changes_reach_the_next_model_call(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    await ask(harness, "first", 0)
    said = await harness.command(
        "model", {"name": TEST_MODELS[2]}, user=fake.admin, channel_id=fake.general_id
    )
    assert said == f"Switched to: {TEST_MODELS[2]}"
    said = await harness.command(
        "mcp",
        {"server": "acme/search"},
        user=fake.admin,
        channel_id=fake.general_id,
        subcommand="add",
    )
    assert said == "Added MCP server: acme/search"
    await ask(harness, "second", 1)
    assert api.last_request["model"] in (TEST_MODELS[2], [TEST_MODELS[2]])
    assert api.last_request["mcp_servers"] == ["acme/search"]

    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert f"Model: {TEST_MODELS[2]}" in status and "MCP Servers: acme/search" in status
    assert "Messages: 4" in status
    interaction = fake.invoke("status", user=fake.member, channel_id=fake.general_id)
    assert (await fake.wait_interaction_reply(interaction)).ephemeral  # views are private

    await harness.command("mcp", user=fake.admin, channel_id=fake.general_id, subcommand="clear")
    await ask(harness, "third", 2)
    assert api.last_request["mcp_servers"] == []


async def test_new_load_and_clear_change_the_history_sent(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    await ask(harness, "in default", 0)
    said = await harness.command(
        "new", {"name": "work"}, user=fake.member, channel_id=fake.general_id
    )
    assert said == "Started new session: work"
    await ask(harness, "in work", 1)
    assert [m["role"] for m in api.messages_sent()] == ["system", "user"]

    listed = await harness.command("list", user=fake.member, channel_id=fake.general_id)
    assert "* work (2 messages)" in listed and "default (2 messages)" in listed
    choices = await fake.autocomplete("load", "name", "def", fake.member, fake.general_id)
    assert [c["value"] for c in choices] == ["default"]

    await harness.command("load", {"name": "default"}, user=fake.member, channel_id=fake.general_id)
    await ask(harness, "back in default", 2)
    assert "in default" in api.messages_sent()[1]["content"]

    await harness.command("clear", user=fake.admin, channel_id=fake.general_id)
    await ask(harness, "after clear", 3)
    assert [m["role"] for m in api.messages_sent()] == ["system", "user"]


async def test_new_with_thread_opens_a_thread_with_its_own_session(harness: Harness) -> None:
    fake = harness.discord
    await ask(harness, "channel talk", 0)
    said = await harness.command(
        "new", {"name": "ideas", "thread": True}, user=fake.member, channel_id=fake.general_id
    )
    thread_id = int(said.split("<#")[1].split(">")[0])
    await harness.say(thread_id, fake.member, "thread talk")  # its own thread: no mention
    await harness.answer(thread_id)
    asked = harness.api.messages_sent(1)  # then the thread's title was asked for
    assert [m["role"] for m in asked] == ["system", "user"] and "thread talk" in asked[1]["content"]
    status = await harness.command("status", user=fake.member, channel_id=thread_id)
    assert "Session: ideas" in status


@pytest.mark.parametrize("name", ["x" * 101, "tab\there"])
async def test_new_with_thread_refuses_a_bad_name_before_opening_the_thread(
    harness: Harness, name: str
) -> None:
    fake = harness.discord
    interaction = fake.invoke(
        "new", {"name": name, "thread": True}, user=fake.member, channel_id=fake.general_id
    )
    reply = await fake.wait_interaction_reply(interaction)
    assert reply.text.startswith("⚠️ A session name") and reply.ephemeral
    assert [e for e, _ in fake.dispatched if e == "THREAD_CREATE"] == []  # no orphan thread
    assert not [r for r in fake.requests if r.path.endswith("/threads")]


async def test_model_autocomplete_offers_the_allowed_models(harness: Harness) -> None:
    fake = harness.discord
    choices = await fake.autocomplete("model", "name", "o", fake.admin, fake.general_id)
    assert [c["value"] for c in choices] == [m for m in TEST_MODELS if "o" in m]


@pytest.mark.parametrize(
    ("name", "options", "subcommand", "said"),
    [
        ("model", {"name": "gpt-2"}, None, "Unknown model 'gpt-2'"),
        ("mcp", {"server": "http://insecure.example.com"}, "add", "Only https://"),
        ("mcp", {"server": "https://u:p@example.com/mcp"}, "add", "credentials are refused"),
        ("mcp", {"server": "acme/none"}, "remove", "is not active"),
        ("load", {"name": "ghost"}, None, "no session named 'ghost'"),
        ("new", {"name": "x" * 101}, None, "at most 100 characters"),
        ("compact", None, None, "nothing to summarize"),
    ],
)
async def test_bad_input_is_explained_privately_and_changes_nothing(
    harness: Harness,
    name: str,
    options: dict[str, str] | None,
    subcommand: str | None,
    said: str,
) -> None:
    fake = harness.discord
    before = await harness.command("status", user=fake.admin, channel_id=fake.general_id)
    interaction = fake.invoke(
        name, options, user=fake.admin, channel_id=fake.general_id, subcommand=subcommand
    )
    reply = await fake.wait_interaction_reply(interaction)
    assert said in reply.text and reply.ephemeral
    shown_to_all = [m for m in fake.bot_messages(fake.general_id) if not m.ephemeral]
    assert [m for m in shown_to_all if m.interaction_id == interaction] == []
    after = await harness.command("status", user=fake.admin, channel_id=fake.general_id)
    assert after == before


async def test_compact_folds_the_history_into_a_summary_the_model_then_sees(
    harness: Harness,
) -> None:
    fake = harness.discord
    await ask(harness, "my favourite colour is teal", 0)
    said = await harness.command("compact", user=fake.admin, channel_id=fake.general_id)
    assert said.startswith("Summary covers the first 2 messages")
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert "Summary: covers the first 2 messages" in status
    await ask(harness, "what colour?", 1)
    sent = harness.api.messages_sent()
    assert [m["role"] for m in sent] == ["system", "system", "user"]
    assert "my favourite colour is teal" in sent[1]["content"]
    assert len(await harness.history(fake.general_id)) == 4  # the messages stay stored
    dm = fake.dm_channel(fake.member)  # in a DM the user may compact their own session
    said = await harness.command("compact", user=fake.member, channel_id=dm)
    assert "nothing to summarize" in said


async def test_in_a_dm_the_user_owns_the_session(harness: Harness) -> None:
    fake = harness.discord
    dm = fake.dm_channel(fake.member)
    said = await harness.command("model", {"name": "3"}, user=fake.member, channel_id=dm)
    assert said == f"Switched to: {TEST_MODELS[2]}"
    with pytest.raises(CommandRefused):  # channel modes make no sense in a DM
        fake.invoke("mode", {"mode": "all"}, user=fake.member, channel_id=dm)


async def test_a_command_is_answered_when_storage_stalls_past_discords_deadline(
    harness: Harness, redis_server: RedisServer
) -> None:
    """Discord drops an interaction not acknowledged within 3 s; a store call may take up to
    its 5 s deadline. Acknowledged first, the command still answers: the storage line here,
    privately even for a public command."""
    fake = harness.discord
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        asked = [
            fake.invoke("new", {"name": "later"}, user=fake.member, channel_id=fake.general_id),
            fake.invoke("status", user=fake.member, channel_id=fake.general_id),
        ]
        replies = [await fake.wait_interaction_reply(i, timeout=60) for i in asked]
        waited = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert waited > fake.interaction_ack_deadline  # answered after Discord's deadline
    for reply in replies:
        assert (
            reply.text
            == "⚠️ Storage is unavailable right now; nothing was changed. Try again shortly."
        )
        assert reply.ephemeral and reply.response_types == [5]
    assert [m for m in fake.bot_messages(fake.general_id) if not m.ephemeral] == []


async def test_a_command_answers_normally_once_a_stalled_storage_resumes(
    harness: Harness, redis_server: RedisServer
) -> None:
    fake = harness.discord
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        asked = fake.invoke("new", {"name": "later"}, user=fake.member, channel_id=fake.general_id)
        await asyncio.sleep(fake.interaction_ack_deadline + 0.5)  # the stall outlasts it
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    reply = await fake.wait_interaction_reply(asked, timeout=60)
    # The store call's own deadline (5 s) is near: on a very slow machine it may fail instead.
    assert reply.text in (
        "Started new session: later",
        "⚠️ Storage is unavailable right now; nothing was changed. Try again shortly.",
    )


async def test_an_error_reply_discord_refuses_is_one_warning_line(
    harness: Harness, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A moderator deletes the public "thinking" message while storage stalls: the storage
    line cannot replace it (Discord answers 404), which is logged as one line."""
    fake = harness.discord
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        asked = fake.invoke("new", {"name": "later"}, user=fake.member, channel_id=fake.general_id)
        thinking = await fake.wait_for(
            lambda: fake.interaction_reply(asked).original, what="the thinking message"
        )
        fake.delete_user_message(fake.general_id, thinking.id)

        def refused() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "could not tell the user" in r.message]

        [line] = await fake.wait_for(refused, timeout=60, what="the refusal logged")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert line.levelno == logging.WARNING and not line.exc_info
    assert line.message == "could not tell the user /new failed: HTTP 404 (code 10008)"
