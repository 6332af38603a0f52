"""Generated Discord messages (any text up to Discord's limit, any attachment type) through
the whole bot: each gets one normal answer within Discord's limits and one stored turn."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.discord_harness import Harness

MENTION_ROOM = 4000 - 23  # Discord's 4,000 characters, less the bot's mention

attachments = st.lists(
    st.tuples(
        st.text(alphabet="abcxyz._-", min_size=1, max_size=20),
        st.sampled_from(
            [
                "image/png",
                "text/plain",
                "text/markdown; charset=utf-8",
                "application/json",
                "application/pdf",
                "video/mp4",
                "",
                "application/x-what",
            ]
        ),
        st.binary(max_size=300),
    ),
    max_size=3,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=st.one_of(
        st.text(max_size=300), st.text(min_size=MENTION_ROOM - 5, max_size=MENTION_ROOM)
    ),
    files=attachments,
)
async def test_any_message_gets_one_normal_answer(
    harness: Harness, text: str, files: list[tuple[str, str, bytes]]
) -> None:
    fake = harness.discord
    channel = fake.create_thread(fake.general_id, "fuzz", owner=fake.member)  # fresh scope
    sent = [fake.add_attachment(name, data, kind) for name, kind, data in files]
    await harness.say(channel, fake.member, text, mentions_bot=True, attachments=sent)
    answers = await harness.answer(channel)
    assert answers and all(0 < len(m.content) <= 2000 for m in answers)
    assert not any(m.content.startswith("⚠️") for m in answers)
    history = await harness.history(channel)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert not fake.refused
