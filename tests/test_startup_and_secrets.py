"""Starting the bot: missing or refused settings end with one clear line; secrets never
reach the log, even through errors."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bot.commands import Commands
from bot.config import load_settings
from bot.discord_bot.client import ChatBot, run_discord
from bot.engine import Engine, EngineLimits
from bot.errors import SettingsError
from bot.model import DedalusModel
from bot.store.base import StorePolicy
from bot.store.redis import RedisStore
from bot.usage import UsageLimits
from tests.bot_process import bot_environment
from tests.conftest import TEST_MODELS
from tests.discord_harness import Harness
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord
from tests.fakes.discord_world import Intent

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({}, "error: DISCORD_TOKEN is not set"),
        ({"DISCORD_TOKEN": "t"}, "error: DEDALUS_API_KEY is not set"),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "REDIS_URL": "localhost"},
            "error: REDIS_URL must be a redis:// URL",
        ),
        (
            {
                "DISCORD_TOKEN": "t",
                "DEDALUS_API_KEY": "k",
                "REDIS_URL": "redis://node:7000/2",
                "REDIS_CLUSTER": "true",
            },
            "error: REDIS_URL must name a cluster node as redis://host:port (database 0)",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "REDIS_CLUSTER": "maybe"},
            "error: REDIS_CLUSTER must be true or false",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "CONTEXT_BUDGET_TOKENS": "lots"},
            "error: CONTEXT_BUDGET_TOKENS must be a positive whole number",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "HISTORY_CACHE_MB": "-1"},
            "error: HISTORY_CACHE_MB must be a whole number >= 0",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "SESSIONS_PER_PLACE": "0"},
            "error: SESSIONS_PER_PLACE must be a positive whole number",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "MESSAGE_CAP_KB": "8192"},
            "error: MESSAGE_CAP_KB is larger than HISTORY_CAP_MB",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "DEFAULT_MODEL": "gpt-2"},
            "error: DEFAULT_MODEL 'gpt-2' is not in ALLOWED_MODELS",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "USER_MESSAGES_PER_MINUTE": "-5"},
            "error: USER_MESSAGES_PER_MINUTE must be a whole number >= 0, got '-5'",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "USER_TOKENS_PER_DAY": "1e6"},
            "error: USER_TOKENS_PER_DAY must be a whole number >= 0, got '1e6'",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "SERVER_TOKENS_PER_DAY": "lots"},
            "error: SERVER_TOKENS_PER_DAY must be a whole number >= 0",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "LIMITS_APPLY_TO_ADMINS": "maybe"},
            "error: LIMITS_APPLY_TO_ADMINS must be true or false, got 'maybe'",
        ),
        (
            {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "SQLITE_SYNCHRONOUS": "off"},
            "error: SQLITE_SYNCHRONOUS must be normal or full, got 'off'",
        ),
    ],
)
def test_a_bad_setting_stops_with_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], said: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(said)


def test_settings_come_from_the_env_file_of_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DISCORD_TOKEN=from-the-file\nMODEL_TIMEOUT_SECONDS=0\n")
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: MODEL_TIMEOUT_SECONDS must be a positive number")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "redis//:hunter2-redis-password@db.example.com:6379/0"),
        ("REDIS_URL", "redis://:hunter2-redis-password@db.example.com:63x79/0"),
        ("REDIS_URL", "rediss://:hunter2-redis-password@[::1/0"),
        ("REDIS_URL", "redis://:hunter2-redis-password@db.example.com/0?socket_timeout=x"),
        ("DEDALUS_BASE_URL", "https//user:hunter2-api-password@api.example.com"),
        ("DEDALUS_BASE_URL", "https://user:hunter2-api-password@api.example.com:99999/"),
    ],
)
def test_a_malformed_url_is_named_but_never_shown(
    tmp_path: Path, variable: str, value: str
) -> None:
    """A URL may carry a password: the start-up error names the variable and the problem,
    and no part of the value reaches the output (it was echoed, up to 40 characters, or a
    traceback showed it)."""
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "DISCORD_TOKEN": "t",
            "DEDALUS_API_KEY": "k",
            variable: value,
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {variable} must be a")
    assert "hunter2" not in output and "example.com" not in output


async def test_a_refused_token_is_reported_as_such(redis_url: str) -> None:
    with FakeDiscord() as fake, fake.point_discord_py_here(), FakeDedalusAPI() as api:
        store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
        model = DedalusModel.connect("test-key", api.base_url, timeout=1, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 10_000))
        bot = ChatBot(engine, Commands(store, TEST_MODELS, TEST_MODELS[0]))
        with pytest.raises(SettingsError, match="DISCORD_TOKEN was refused by Discord"):
            await run_discord(bot, "not-the-token")
        await store.close()


def test_a_missing_message_content_intent_stops_with_one_line_saying_where_to_switch_it_on(
    redis_url: str,
) -> None:
    without_content = Intent.PRIVILEGED & ~Intent.MESSAGE_CONTENT
    with FakeDiscord(portal_intents=without_content) as fake, FakeDedalusAPI() as api:
        result = subprocess.run(
            [sys.executable, "-m", "tests.bot_process"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=bot_environment(fake, api, redis_url),
        )
        identified = fake.identify_payload
    assert identified is not None and identified["intents"] & Intent.MESSAGE_CONTENT
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and fake.token not in output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Message Content intent" in last
    assert "switch it on in the Developer Portal" in last
    assert [line for line in output.splitlines() if "error" in line.lower()] == [last]


async def test_no_secret_reaches_the_log(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = harness.discord
    harness.api.reply_error(500)
    harness.api.reply_error(401)
    for text in ("first", "second", "third"):
        await harness.say(fake.general_id, fake.member, text, mentions_bot=True)
    await harness.answer(fake.general_id, 3)
    await harness.command("status", user=fake.member, channel_id=fake.general_id)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert "model call failed" in logged  # the faults were logged ...
    assert fake.token not in logged and harness.api.api_key not in logged  # ... without secrets
    shown = "\n".join(m.content for m in fake.bot_messages(fake.general_id))
    assert "refused the bot's API key" in shown and harness.api.api_key not in shown


def test_usage_limits_are_off_unless_set() -> None:
    base = {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k"}
    assert load_settings(base).usage_limits == UsageLimits()
    chosen = {
        "USER_MESSAGES_PER_MINUTE": "5",
        "USER_TOKENS_PER_DAY": "20000",
        "SERVER_TOKENS_PER_DAY": "500000",
        "LIMITS_APPLY_TO_ADMINS": "true",
    }
    assert load_settings(base | chosen).usage_limits == UsageLimits(5, 20_000, 500_000, True)
