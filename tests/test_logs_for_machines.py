"""`LOG_FORMAT=json`: a real bot process writes one JSON object per line, every line (discord.py's
too); the lines about a turn name its scope, session and Discord message; no line holds what
people wrote, what the model answered, or a secret."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.discord_bot.scopes import scope_for
from bot.logs import JsonFormatter
from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

QUESTION = "the words members wrote 7f3a"
ANSWER = "the words the model answered 9c1e"


@pytest.fixture
def fakes() -> Iterator[tuple[FakeDiscord, FakeDedalusAPI]]:
    with FakeDiscord(rate_limit=1000) as discord_fake, FakeDedalusAPI() as api:
        yield discord_fake, api


async def test_every_line_is_json_naming_the_turn_and_holding_no_content_or_secret(
    fakes: tuple[FakeDiscord, FakeDedalusAPI], redis_url: str, tmp_path: Path
) -> None:
    fake, api = fakes
    env = bot_environment(
        fake, api, redis_url, LOG_FORMAT="json", LOG_LEVEL="DEBUG", MODEL_MAX_RETRIES="0"
    )
    bot = BotProcess(env, tmp_path / "bot.log")
    try:
        wait_connected([bot])
        api.reply_error(500, message=f"upstream failure quoting {QUESTION}")
        failed = fake.user_says(fake.general_id, fake.member, QUESTION, mentions_bot=True)
        await fake.wait_for(lambda: fake.bot_messages(fake.general_id), what="the failure reply")
        api.reply_text(ANSWER)
        fake.user_says(fake.general_id, fake.member, QUESTION + " again", mentions_bot=True)
        await fake.wait_for(
            lambda: len(fake.bot_messages(fake.general_id)) == 2 or None, what="the answer"
        )
        bot.process.send_signal(signal.SIGTERM)
        assert bot.process.wait(30) == 0
    finally:
        bot.stop()

    text = bot.text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(lines) >= 3
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    assert any(line["logger"].startswith("discord.") for line in lines)
    (failure,) = [line for line in lines if line["message"].startswith("model call failed")]
    assert failure["level"] == "WARNING"
    assert failure["scope"] == scope_for(fake.general_id)
    assert failure["session"] == "default"
    assert failure["message_id"] == str(failed)
    for private in (QUESTION, ANSWER, fake.token, env["DEDALUS_API_KEY"]):
        assert private not in text


async def test_debug_lines_in_the_readable_format_hold_no_content_either(
    fakes: tuple[FakeDiscord, FakeDedalusAPI], redis_url: str, tmp_path: Path
) -> None:
    """discord.py and the SDK dump whole payloads at DEBUG; `LOG_LEVEL=DEBUG` is for the
    bot's own lines, so theirs stay at INFO."""
    fake, api = fakes
    bot = BotProcess(bot_environment(fake, api, redis_url, LOG_LEVEL="DEBUG"), tmp_path / "b.log")
    try:
        wait_connected([bot])
        api.reply_text(ANSWER)
        fake.user_says(fake.general_id, fake.member, QUESTION, mentions_bot=True)
        await fake.wait_for(lambda: fake.bot_messages(fake.general_id), what="the answer")
        bot.process.send_signal(signal.SIGTERM)
        assert bot.process.wait(30) == 0
    finally:
        bot.stop()
    assert "DEBUG" in bot.text()  # the bot's own debug lines are there
    assert QUESTION not in bot.text() and ANSWER not in bot.text()


def test_an_exception_is_logged_by_type_and_place_without_its_message() -> None:
    """An SDK error's text can quote the request; the JSON line keeps where it came from."""
    try:
        raise ValueError(f"could not parse {QUESTION}")
    except ValueError:
        record = logging.LogRecord(
            "bot.engine", logging.ERROR, __file__, 1, "a turn failed", (), sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["error"] == "ValueError"
    assert line["where"] and __file__ in line["where"][-1]
    assert QUESTION not in json.dumps(line)
    assert "scope" not in line  # logged outside any turn
