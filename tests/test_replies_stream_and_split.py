"""Replies as people see them: typing, a streamed message that ends as the full answer, long
answers in ordered pieces with intact code blocks, and no pings from the model's text."""

from __future__ import annotations

from tests.discord_harness import Harness

LONG_ANSWER = (
    "Here is the plan.\n\n"
    + "\n\n".join(f"Step {i}: " + "do the thing carefully " * 12 for i in range(8))
    + "\n\n```python\n"
    + "\n".join(f"print({i})  # line {i}" for i in range(110))
    + "\n```\n\nThat is everything."
)


async def test_a_streamed_reply_is_edited_and_ends_as_the_full_answer(harness: Harness) -> None:
    fake = harness.discord
    text = " ".join(f"word{i}" for i in range(60))
    harness.api.reply_text(text, chunk_size=12, chunk_delay=0.08)
    asked = await harness.say(fake.general_id, fake.member, "stream please", mentions_bot=True)
    [reply] = await harness.answer(fake.general_id)
    assert reply.content == text
    assert len(reply.history) >= 2 and reply.history[0] != text  # it grew by edits
    assert reply.reply_to == asked
    assert fake.general_id in fake.typing_calls
    stored = await harness.history(fake.general_id)
    assert stored[-1] == {"role": "assistant", "content": text}


async def test_a_4500_character_answer_arrives_in_order_with_intact_code(
    harness: Harness,
) -> None:
    fake = harness.discord
    assert len(LONG_ANSWER) > 4500
    harness.api.reply_text(LONG_ANSWER, chunk_size=400)
    await harness.say(fake.general_id, fake.member, "long one", mentions_bot=True)
    await harness.answer(fake.general_id, 3)
    pieces = [m.content for m in harness.answers(fake.general_id)]
    assert len(pieces) == 3 and all(len(p) <= 2000 for p in pieces)
    for piece in pieces:
        fences = [line for line in piece.split("\n") if line.startswith("```")]
        assert len(fences) % 2 == 0, piece[-200:]
    joined = "\n".join(pieces)
    assert joined.startswith("Here is the plan.") and joined.endswith("That is everything.")
    assert all(f"print({i})  # line {i}" in joined for i in range(110))
    assert [line for line in joined.split("\n") if line.startswith("Step")] == [
        line for line in LONG_ANSWER.split("\n") if line.startswith("Step")
    ]
    assert not fake.refused


async def test_the_models_text_cannot_ping_anyone(harness: Harness) -> None:
    fake = harness.discord
    harness.api.reply_text("@everyone @here <@&1> look!")
    await harness.say(fake.general_id, fake.member, "ping them", mentions_bot=True)
    [reply] = await harness.answer(fake.general_id)
    assert reply.allowed_mentions is not None
    assert reply.allowed_mentions["parse"] == []
    assert reply.allowed_mentions.get("roles", []) == []
    assert reply.allowed_mentions.get("users", []) == []


async def test_streaming_edits_stay_within_discords_edit_rate(harness: Harness) -> None:
    fake = harness.discord
    fake.strict_edit_rate = True  # like Discord: more than 5 edits of a message in 5 s is a 429
    text = " ".join(f"token{i}" for i in range(120))
    harness.api.reply_text(text, chunk_size=20, chunk_delay=0.15)  # about 6 s of streaming
    await harness.say(fake.general_id, fake.member, "a slow stream", mentions_bot=True)
    await harness.answer(fake.general_id, timeout=60)
    [reply] = await fake.wait_for(
        lambda: [m for m in harness.answers(fake.general_id) if m.content == text],
        timeout=30,
        what="the final edit",
    )
    assert len(reply.history) >= 4  # it was edited along the way...
    assert fake.rate_limited == []  # ...never faster than Discord allows
