"""Odd but legal messages (empty, at Discord's length limit, exotic text, unknown files) get
a normal answer and a consistent history."""

from __future__ import annotations

import pytest

from tests.discord_harness import Harness

ODD_TEXTS = {
    "only-a-mention": "",
    "discord-maximum": "x" * 3977,  # with the mention: 4,000 characters, Discord's limit
    "right-to-left-and-emoji": "\u202eabc 🙂🙂 \u200b\u0000",
    "markdown-and-fences": "```\nunclosed fence @everyone <@&123>",
    "private-use-and-noncharacter": "\ud7ff\ue000\uffff",
}


@pytest.mark.parametrize("text", ODD_TEXTS.values(), ids=ODD_TEXTS.keys())
async def test_odd_text_is_answered_normally(harness: Harness, text: str) -> None:
    fake = harness.discord
    await harness.say(fake.general_id, fake.member, text, mentions_bot=True)
    answers = await harness.answer(fake.general_id)
    assert answers and all(0 < len(m.content) <= 2000 for m in answers)
    history = await harness.history(fake.general_id)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert not fake.refused


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("archive.zip", "application/zip"),
        ("noext", ""),
        ("song.mp3", "audio/mpeg"),
        ("big.txt", "text/plain"),
        ("weird.bin", "application/x-unknown; charset=binary"),
    ],
)
async def test_files_the_bot_cannot_read_are_noted_not_dropped(
    harness: Harness, filename: str, content_type: str
) -> None:
    fake = harness.discord
    data = b"x" * (60_000 if filename == "big.txt" else 10)
    attachment = fake.add_attachment(filename, data, content_type)
    await harness.say(
        fake.general_id, fake.member, "here", mentions_bot=True, attachments=[attachment]
    )
    await harness.answer(fake.general_id)
    sent = harness.api.messages_sent()[1]["content"]
    assert f"{filename}" in sent and "was not read" in sent
