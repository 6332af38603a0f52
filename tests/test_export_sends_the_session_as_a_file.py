"""`/export` sends the current session as a file only the person who asked sees: the
reference's JSON, which `python -m bot import` reads back into the same history, or Markdown
to read, with code blocks intact. Bad input is one line and changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.commands import Commands
from bot.discord_bot.scopes import scope_for
from bot.errors import InvalidInput
from bot.store.base import Message, SessionSettings, SessionStore
from bot.store.sqlite import SqliteStore
from tests.conftest import TEST_MODELS
from tests.discord_harness import Harness
from tests.fakes.discord_gateway import CommandRefused, InteractionReply

ROOT = Path(__file__).resolve().parents[1]
NESTED_FENCES = (
    "Write a block inside a block with a longer fence:\n\n"
    "````markdown\n```python\nprint(\"`hi`\", '``')\n```\n````\n\n"
    "Inline `code` and ``double `ticks` `` stay too."
)
TOOL_ROUND: list[Message] = [
    {"role": "user", "content": "[Bob Member (user id 5)]: weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "assistant", "content": "It is sunny, 18 C."},
]


async def export(harness: Harness, user: dict[str, Any], channel: int, **options: str) -> Any:
    interaction = harness.discord.invoke("export", options, user=user, channel_id=channel)
    return await harness.discord.wait_interaction_reply(interaction)


def the_file(harness: Harness, reply: InteractionReply) -> tuple[str, bytes]:
    [message] = reply.messages
    [attachment] = message.attachments
    return attachment["filename"], harness.discord.attachment_data(attachment)


async def talk(harness: Harness, *answers: str) -> None:
    fake = harness.discord
    for i, answer in enumerate(answers):
        harness.api.reply_text(answer)
        question = f"question {i} <@{fake.admin_id}>"
        await harness.say(fake.general_id, fake.member, question, mentions_bot=True)
        await harness.answer(fake.general_id, i + 1)


def import_with_the_cli(path: Path, tmp_path: Path, scope: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "SQLITE_PATH": str(tmp_path / "fresh.sqlite3"),
    }
    return subprocess.run(
        [sys.executable, "-m", "bot", "import", str(path), "--scope", scope],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )


async def test_a_json_export_imports_back_into_the_same_history(
    harness: Harness, tmp_path: Path
) -> None:
    fake = harness.discord
    await talk(harness, "Bonjour, ça va ? 🎉", NESTED_FENCES)
    history = await harness.history(fake.general_id)
    assert len(history) == 4

    reply = await export(harness, fake.member, fake.general_id, format="json")
    assert reply.ephemeral  # only the person who asked sees it
    assert reply.text == "Session default (4 messages) as json: what python -m bot import reads."
    filename, data = the_file(harness, reply)
    assert filename == "default.json"
    assert json.loads(data) == {"default": history}
    assert [m for m in fake.bot_messages(fake.general_id) if not m.ephemeral][2:] == []

    exported = tmp_path / filename
    exported.write_bytes(data)
    imported = import_with_the_cli(exported, tmp_path, "elsewhere")
    assert imported.returncode == 0, imported.stderr
    fresh = SqliteStore(tmp_path / "fresh.sqlite3", harness.policy)
    try:
        assert await fresh.read_history("elsewhere", "default") == history
    finally:
        await fresh.close()


async def test_a_markdown_export_keeps_speakers_and_code_blocks(harness: Harness) -> None:
    fake = harness.discord
    await talk(harness, NESTED_FENCES, "```python\nprint('left open')")
    harness.api.reply_text("after the open block")
    await harness.say(fake.general_id, fake.admin, "one more", mentions_bot=True)
    await harness.answer(fake.general_id, 3)

    reply = await export(harness, fake.member, fake.general_id, format="markdown")
    assert reply.ephemeral
    filename, data = the_file(harness, reply)
    text = data.decode()
    assert filename == "default.md"
    assert text.startswith("# Session default\n") and "- Messages: 6\n" in text
    assert f"- Model: {TEST_MODELS[0]}\n" in text
    assert "### Bob Member\n\nquestion 0 @Alice Admin\n" in text  # speakers by name
    assert f"### Assistant\n\n{NESTED_FENCES}\n" in text  # the block, byte for byte
    # A block an answer left open is closed, so the next speaker is not read as code.
    assert "```python\nprint('left open')\n```\n\n### Alice Admin\n\none more\n" in text
    assert "user id" not in text


async def test_a_markdown_export_summarises_tool_calls(harness: Harness) -> None:
    fake = harness.discord
    assert harness.store is not None
    settings = SessionSettings(TEST_MODELS[0])
    await harness.store.import_sessions(scope_for(fake.general_id), {"tools": TOOL_ROUND}, settings)
    await harness.command("load", {"name": "tools"}, user=fake.member, channel_id=fake.general_id)
    reply = await export(harness, fake.member, fake.general_id, format="markdown")
    filename, data = the_file(harness, reply)
    assert filename == "tools.md"
    text = data.decode()
    assert '> Called tool `weather` with `{"city": "Paris"}`' in text
    assert "> Tool `weather` returned 11 characters." in text
    assert "### Assistant\n\nIt is sunny, 18 C." in text


async def test_a_large_session_goes_as_a_file_and_one_too_large_is_refused(
    harness: Harness,
) -> None:
    fake = harness.discord
    assert harness.store is not None
    long_answers: list[Message] = [
        message
        for i in range(40)
        for message in (
            {"role": "user", "content": f"[Bob Member (user id 5)]: part {i}"},
            {"role": "assistant", "content": f"{i} " + "words " * 500},
        )
    ]
    settings = SessionSettings(TEST_MODELS[0])
    await harness.store.import_sessions(
        scope_for(fake.general_id), {"default": long_answers}, settings
    )
    reply = await export(harness, fake.member, fake.general_id)  # json by default
    [message] = reply.messages  # one message: a line and the file, never the text
    assert len(message.content) < 200 and reply.followups == []
    _, data = the_file(harness, reply)
    assert len(data) > 100_000 and json.loads(data) == {"default": long_answers}

    fake.attachment_size_limit = 50_000  # what Discord announced for this interaction
    before = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    reply = await export(harness, fake.member, fake.general_id, format="markdown")
    assert reply.ephemeral and [m.attachments for m in reply.messages] == [[]]
    assert re.match(r"⚠️ This session's export is \d+ KB, over the 48 KB a file", reply.text)
    assert f"--scope discord:{fake.general_id}" in reply.text and "\n" not in reply.text
    assert fake.refused == []
    assert await harness.command("status", user=fake.member, channel_id=fake.general_id) == before


async def test_nothing_to_export_is_one_line_and_a_dm_can_export(harness: Harness) -> None:
    fake = harness.discord
    reply = await export(harness, fake.member, fake.general_id)
    assert reply.ephemeral and reply.text == (
        "⚠️ Session default has no messages yet; nothing to export."
    )
    assert [m.attachments for m in reply.messages] == [[]]
    dm = fake.dm_channel(fake.member)
    await harness.say(dm, fake.member, "hello in private")
    await harness.answer(dm)
    reply = await export(harness, fake.member, dm, format="markdown")
    _, data = the_file(harness, reply)
    assert "hello in private" in data.decode()


async def test_anyone_may_export_and_only_the_listed_formats_are_offered(
    harness: Harness,
) -> None:
    fake = harness.discord
    [command] = [c for c in fake.commands() if c["name"] == "export"]
    assert command["default_member_permissions"] is None  # every member, like /status
    [option] = command["options"]
    assert [c["value"] for c in option["choices"]] == ["json", "markdown"]
    with pytest.raises(CommandRefused):  # Discord delivers nothing else
        fake.invoke("export", {"format": "pdf"}, user=fake.member, channel_id=fake.general_id)


async def test_an_unknown_format_is_one_line_and_changes_nothing(store: SessionStore) -> None:
    """The check the core makes for callers Discord does not filter (the console, a tool)."""
    commands = Commands(store, TEST_MODELS, TEST_MODELS[0])
    with pytest.raises(InvalidInput, match=r"^Unknown format 'pdf'\. Choose one of: json"):
        await commands.export("place", "pdf")
    assert await store.list_sessions("place") == []
