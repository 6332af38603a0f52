"""The model can tell speakers apart and reads mentions and attachments as people see them."""

from __future__ import annotations

from tests.discord_harness import Harness


async def test_each_user_message_carries_its_speaker(harness: Harness) -> None:
    fake = harness.discord
    await harness.say(fake.general_id, fake.member, "I like tea", mentions_bot=True)
    await harness.answer(fake.general_id)
    await harness.say(fake.general_id, fake.admin, "I like coffee", mentions_bot=True)
    await harness.answer(fake.general_id, 2)
    sent = harness.api.messages_sent()
    member_name, admin_name = fake.member["global_name"], fake.admin["global_name"]
    assert sent[1]["content"] == f"[{member_name} (user id {fake.member_id})]: I like tea"
    assert sent[3]["content"] == f"[{admin_name} (user id {fake.admin_id})]: I like coffee"


async def test_mentions_become_readable_names(harness: Harness) -> None:
    fake = harness.discord
    text = f"ask <@{fake.admin_id}> about <#{fake.random_id}>"
    await harness.say(fake.general_id, fake.member, text, mentions_bot=True)
    await harness.answer(fake.general_id)
    content = harness.api.messages_sent()[1]["content"]
    assert content.endswith(f"ask @{fake.admin['global_name']} about #random")
    assert f"<@{fake.bot_id}>" not in content


async def test_attachments_reach_the_model_or_are_noted(harness: Harness) -> None:
    fake = harness.discord
    files = [
        fake.add_attachment("cat.png", b"\x89PNG fake", "image/png"),
        fake.add_attachment("notes.txt", b"remember the milk", "text/plain"),
        fake.add_attachment("tool.exe", b"MZ", "application/octet-stream"),
    ]
    await harness.say(
        fake.general_id, fake.member, "see files", mentions_bot=True, attachments=files
    )
    await harness.answer(fake.general_id)
    [text_part, image_part] = harness.api.messages_sent()[1]["content"]
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"] == files[0]["url"]
    assert "[file notes.txt]\n```\nremember the milk\n```" in text_part["text"]
    assert "tool.exe (application/octet-stream) was not read" in text_part["text"]
