"""Tokens are counted as the model service reports them (or estimated, and marked so, when
it does not), shown by /status and /usage, and limited: a member over a limit gets one
short reply that pings nobody, and their message reaches neither the model nor the
history. Time is the harness's clock, moved forward by the test, never waited for."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.discord_bot.scopes import scope_for
from bot.engine import Engine, EngineLimits
from bot.model import DedalusModel
from bot.store.base import SessionStore
from bot.store.redis import scope_key, usage_key
from bot.usage import Account, UsageLimits, day_of
from tests.discord_harness import Harness
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_world import Message as Posted

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC
DAY = 86_400


async def ask(harness: Harness, author: dict[str, Any], text: str, channel: int = 0) -> None:
    """Mention the bot and wait for its answer there (one more bot message than before)."""
    channel = channel or harness.discord.general_id
    before = len(harness.answers(channel))
    await harness.say(channel, author, text, mentions_bot=True)
    await harness.answer(channel, before + 1)


def totals(reported: list[dict[str, int]]) -> tuple[int, int]:
    return (
        sum(u["prompt_tokens"] for u in reported),
        sum(u["completion_tokens"] for u in reported),
    )


async def test_status_shows_the_tokens_the_model_service_reported(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    api.reply_text("A first answer, long enough to be several tokens.")
    await ask(harness, fake.member, "hello")
    api.reply_text("A second one.")
    await ask(harness, fake.admin, "and again")
    in_general = api.reported_usage
    assert len(in_general) == 2  # streamed answers report usage when asked to
    await ask(harness, fake.member, "elsewhere", fake.random_id)
    [in_random] = api.reported_usage[2:]

    tokens_in, tokens_out = totals(in_general)
    session = tokens_in + tokens_out
    server = session + sum(totals([in_random]))
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    lines = status.splitlines()
    assert f"Tokens: {tokens_in:,} in, {tokens_out:,} out" in lines
    share = f"{100 * session / server:.0f}%"
    assert f"Today: {session:,} tokens, {share} of this server's {server:,}" in lines
    assert "~" not in status and "estimate" not in status


async def test_tokens_not_reported_are_estimated_and_marked(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    api.report_usage = False
    await ask(harness, fake.member, "hello")
    assert api.reported_usage == []
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    marked = r"Tokens: ~(\d+) in, ~(\d+) out \(~(\d+) of (\d+) estimated from text\)"
    found = re.search(marked, status)
    assert found, status
    tokens_in, tokens_out, estimated, total = map(int, found.groups())
    assert tokens_in > 0 and tokens_out > 0 and estimated == total == tokens_in + tokens_out


async def test_usage_shows_the_servers_days_and_top_users_without_pinging(
    harness: Harness,
) -> None:
    fake, api = harness.discord, harness.api
    harness.clock = lambda: NOW
    await harness.restart()
    api.reply_text("Short.")
    await ask(harness, fake.admin, "first")
    api.reply_text("A long answer for the member. " * 20)
    await ask(harness, fake.member, "second")
    await ask(harness, fake.member, "in a DM", fake.dm_channel(fake.member))  # not this server's
    admin, member, _ = api.reported_usage
    harness.clock = lambda: NOW + 3 * DAY  # the same tokens: no longer today's

    interaction = fake.invoke("usage", user=fake.admin, channel_id=fake.general_id)
    reply = await fake.wait_interaction_reply(interaction)
    tokens_in, tokens_out = totals([member, admin])
    assert reply.text.splitlines() == [
        "Token use here (UTC days):",
        "Today: 0 tokens (0 in, 0 out)",
        f"Last 30 days: {tokens_in + tokens_out:,} tokens ({tokens_in:,} in, {tokens_out:,} out)",
        "Top users, last 30 days:",
        f"1. <@{fake.member_id}>: {sum(totals([member])):,} tokens",
        f"2. <@{fake.admin_id}>: {sum(totals([admin])):,} tokens",
    ]
    assert reply.ephemeral
    [shown] = reply.messages
    assert shown.mentions == [] and "users" not in (shown.allowed_mentions or {}).get("parse", [])


async def limited(harness: Harness, limits: UsageLimits, clock: list[float]) -> None:
    harness.usage_limits = limits
    harness.clock = lambda: clock[0]
    await harness.restart()


async def refused(
    harness: Harness, caplog: pytest.LogCaptureFixture, author: dict[str, Any], text: str
) -> int:
    """Say `text`, mentioning the bot, and wait until the bot decided not to answer it."""
    caplog.set_level(logging.INFO, logger="bot.discord_bot.conversation")
    fake = harness.discord
    said = await harness.say(fake.general_id, author, text, mentions_bot=True)
    await fake.wait_for(
        lambda: f"message {said} not answered: its author is over a usage limit" in caplog.text,
        what=f"message {said} refused",
    )
    await harness.settled()
    return said


def notices(harness: Harness) -> list[Posted]:
    posted = harness.answers(harness.discord.general_id)
    return [m for m in posted if "not sent to the model" in m.content]


async def test_a_member_over_the_message_rate_is_told_once_and_can_continue_later(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake, api = harness.discord, harness.api
    clock = [NOW]
    await limited(harness, UsageLimits(messages_per_minute=2), clock)
    await ask(harness, fake.member, "one")
    clock[0] += 20
    await ask(harness, fake.member, "two")
    clock[0] += 10
    third = await refused(harness, caplog, fake.member, "three")
    [notice] = notices(harness)
    assert notice.content == (
        "You can send 2 messages a minute to the bot; you can continue in 30 s. "
        "This message was not sent to the model."
    )
    assert notice.reply_to == third and notice.mentions == []  # a reply that pings nobody
    assert notice.allowed_mentions == {"parse": [], "replied_user": False}
    clock[0] += 29
    await refused(harness, caplog, fake.member, "four")
    assert len(notices(harness)) == 1  # once a minute at most
    assert api.request_count == 2
    stored = await harness.history(fake.general_id)
    assert [m["content"].split(": ", 1)[1] for m in stored if m["role"] == "user"] == ["one", "two"]

    await ask(harness, fake.admin, "admins are exempt")
    clock[0] += 1  # a minute after "one"
    await ask(harness, fake.member, "five")
    assert api.request_count == 4


@pytest.mark.parametrize("apply_to_admins", [False, True])
async def test_admins_are_exempt_unless_the_setting_says_otherwise(
    harness: Harness, caplog: pytest.LogCaptureFixture, apply_to_admins: bool
) -> None:
    fake = harness.discord
    limits = UsageLimits(messages_per_minute=1, apply_to_admins=apply_to_admins)
    await limited(harness, limits, [NOW])
    await ask(harness, fake.admin, "one")
    if apply_to_admins:
        await refused(harness, caplog, fake.admin, "two")
        assert len(notices(harness)) == 1
    else:
        await ask(harness, fake.admin, "two")
        assert notices(harness) == []


async def test_a_daily_token_budget_holds_until_the_next_day(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake, api = harness.discord, harness.api
    clock = [NOW]
    await limited(harness, UsageLimits(user_tokens_per_day=1), clock)
    await ask(harness, fake.member, "one")  # under the budget when asked; over it after
    await refused(harness, caplog, fake.member, "two")
    [notice] = notices(harness)
    assert notice.content == (
        "You have used your 1 tokens for today; you can continue at 00:00 UTC (in 16 h 0 min). "
        "This message was not sent to the model."
    )
    await ask(harness, fake.admin, "an admin is not limited")
    clock[0] += 16 * 3600
    await ask(harness, fake.member, "three")
    assert api.request_count == 3


async def test_a_run_without_streaming_is_counted_as_reported(
    store: SessionStore,
) -> None:
    """The console and the commands that call the model without streaming: every call of
    the run (a tool round is two) is counted."""
    with FakeDedalusAPI() as api:
        model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 100_000), clock=lambda: NOW)
        account = Account("guild:1", "ada")
        api.reply_text("A plain answer.")
        reply = await engine.reply("chan", {"role": "user", "content": "hi"}, account=account)
        [reported] = api.reported_usage
        assert reply.usage is not None and not reply.usage.estimated
        assert (reply.usage.input_tokens, reply.usage.output_tokens) == totals([reported])
        usage = await store.session_usage("chan", "default", "guild:1", day_of(NOW))
        assert (usage.input_tokens, usage.output_tokens) == totals([reported])
        await model.close()


async def test_junk_where_token_counts_belong_is_replaced(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A key of another type where a place's token totals, or a server's day, belong: the
    junk (nothing readable) is dropped and counting starts again; the turn is unaffected."""
    fake, api = harness.discord, harness.api
    harness.clock = lambda: NOW
    await harness.restart()
    client = aioredis.Redis.from_url(harness.redis_url, decode_responses=True)
    await client.set(scope_key(scope_for(fake.general_id), "usage"), "junk")
    await client.rpush(usage_key(f"guild:{fake.guild_id}", f"day:{day_of(NOW)}"), "junk")
    await client.aclose()
    await ask(harness, fake.member, "hello")
    assert len(await harness.history(fake.general_id)) == 2
    tokens_in, tokens_out = totals(api.reported_usage)
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert f"Tokens: {tokens_in:,} in, {tokens_out:,} out" in status.splitlines()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
