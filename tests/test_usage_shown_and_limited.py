"""Tokens are counted as the model service reports them (or estimated, and marked so, when
it does not), shown by /status and /usage, and limited: a member over a limit gets one
short reply that pings nobody, and their message reaches neither the model nor the
history. Time is the harness's clock, moved forward by the test, never waited for."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.discord_bot.scopes import scope_for
from bot.engine import Engine, EngineLimits
from bot.errors import ModelError
from bot.model import DedalusModel
from bot.store.base import SessionStore
from bot.store.redis import scope_key, usage_key
from bot.usage import Account, UsageLimits, day_of, estimate_tokens
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


async def test_the_message_that_crosses_the_daily_budget_is_answered_and_counted(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The budget is checked when a message is admitted, before its cost is known: the
    message admitted under it is answered in full and charged, the next one is refused."""
    fake, api = harness.discord, harness.api
    clock = [NOW]
    await limited(harness, UsageLimits(), clock)
    await ask(harness, fake.member, "one")
    [first] = api.reported_usage
    budget = sum(totals([first])) + 1  # one token left
    await limited(harness, UsageLimits(user_tokens_per_day=budget), clock)
    long_answer = " ".join(["A long answer that takes the member over the budget."] * 10)
    api.reply_text(long_answer)
    await ask(harness, fake.member, "two")
    assert harness.answers(fake.general_id)[-1].content == long_answer  # in full
    await refused(harness, caplog, fake.member, "three")
    [notice] = notices(harness)
    assert notice.content.startswith(f"You have used your {budget:,} tokens for today;")
    assert api.request_count == 2

    tokens_in, tokens_out = totals(api.reported_usage)  # the crossing turn included
    total = tokens_in + tokens_out
    assert total > budget
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert f"Tokens: {tokens_in:,} in, {tokens_out:,} out" in status.splitlines()
    assert f"Today: {total:,} tokens, 100% of this server's {total:,}" in status.splitlines()
    usage = await harness.command("usage", user=fake.admin, channel_id=fake.general_id)
    assert f"Today: {total:,} tokens ({tokens_in:,} in, {tokens_out:,} out)" in usage
    assert f"1. <@{fake.member_id}>: {total:,} tokens" in usage.splitlines()


ESTIMATED = r"Tokens: ~(\d+) in, ~(\d+) out \(~(\d+) of (\d+) estimated from text\)"


@pytest.mark.parametrize("drop", [False, True], ids=["error-event", "disconnect"])
async def test_an_answer_broken_off_midway_is_charged_as_an_estimate(
    harness: Harness, drop: bool
) -> None:
    """The API accepted the call and spent tokens, but the answer never reached its end
    (where `usage` comes): what was sent and what arrived are charged, marked estimated."""
    fake, api = harness.discord, harness.api
    partial = "The answer begins well enough, and then"
    api.reply_stream_error(after_text=partial, drop=drop)
    await ask(harness, fake.member, "a question cut short")
    assert "broke off" in harness.answers(fake.general_id)[-1].content
    assert api.reported_usage == [] and await harness.history(fake.general_id) == []

    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    found = re.search(ESTIMATED, status)
    assert found, status
    tokens_in, tokens_out, estimated, total = map(int, found.groups())
    assert tokens_out == estimate_tokens(len(partial))  # the text that arrived
    sent = json.dumps(api.last_request["messages"], separators=(",", ":"))
    assert tokens_in >= estimate_tokens(len(sent))  # at least the messages sent
    assert estimated == total == tokens_in + tokens_out
    assert f"Today: {total:,} tokens, 100% of this server's {total:,}" in status.splitlines()


async def test_a_call_refused_with_an_error_status_costs_nothing(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    await ask(harness, fake.member, "hello")
    before = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    api.reply_error(500)
    await ask(harness, fake.member, "during an outage")
    api.reply_error(400, code="invalid_request")
    await ask(harness, fake.member, "refused")
    said = [m.content for m in harness.answers(fake.general_id)[1:]]
    assert "unavailable" in said[0] and "refused the request" in said[1]
    after = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert after == before
    tokens_in, tokens_out = totals(api.reported_usage)
    assert f"Tokens: {tokens_in:,} in, {tokens_out:,} out" in after.splitlines()


async def test_a_run_that_fails_after_a_call_is_charged_what_that_call_reported(
    store: SessionStore,
) -> None:
    """A tool round answered (its tokens reported), then the next call of the run failed:
    the run is charged the first call's tokens, exactly; the refused call adds nothing."""
    with FakeDedalusAPI() as api:
        model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 100_000), clock=lambda: NOW)
        account = Account("guild:1", "ada")
        api.reply_tool_call("lookup", {"q": "x"})
        api.reply_error(500)
        with pytest.raises(ModelError):
            await engine.reply("chan", {"role": "user", "content": "hi"}, account=account)
        [reported] = api.reported_usage
        usage = await store.session_usage("chan", "default", "guild:1", day_of(NOW))
        assert (usage.input_tokens, usage.output_tokens) == totals([reported])
        assert usage.estimated_tokens == 0 and usage.server_today == sum(totals([reported]))
        assert await store.read_history("chan", "default") == []  # the turn is not saved
        await model.close()


async def test_compact_and_background_summaries_count_in_the_totals(harness: Harness) -> None:
    """A summary is a model call like an answer: its tokens count in the session's and the
    server's totals, charged to the member whose turn set it off, or to who ran /compact."""
    fake, api = harness.discord, harness.api
    await ask(harness, fake.member, "one")
    await ask(harness, fake.member, "two")
    said = await harness.command("compact", user=fake.admin, channel_id=fake.general_id)
    assert said.startswith("Summary covers the first 4 messages")
    member, member_again, compact = api.reported_usage
    assert len(api.summary_requests) == 1
    tokens_in, tokens_out = totals(api.reported_usage)
    status = await harness.command("status", user=fake.member, channel_id=fake.general_id)
    assert f"Tokens: {tokens_in:,} in, {tokens_out:,} out" in status.splitlines()
    usage = await harness.command("usage", user=fake.admin, channel_id=fake.general_id)
    assert f"Today: {tokens_in + tokens_out:,} tokens" in usage
    top = sorted(
        [
            (sum(totals([member, member_again])), fake.member_id),
            (sum(totals([compact])), fake.admin_id),
        ],
        reverse=True,
    )
    assert usage.splitlines()[-2:] == [
        f"{i}. <@{user}>: {tokens:,} tokens" for i, (tokens, user) in enumerate(top, 1)
    ]

    harness.budget_bytes = 1_500  # the history soon outgrows the budget: summaries follow
    await harness.restart()
    for _ in range(12):
        api.reply_text("An answer of some length, to fill the history. " * 3)
        await ask(harness, fake.member, "more " * 20, fake.random_id)
        if len(api.summary_requests) > 1:
            break
    assert harness.bot is not None
    await harness.bot.engine.background_done()
    assert len(api.summary_requests) > 1
    reported = api.reported_usage[3:]
    tokens_in, tokens_out = totals(reported)
    status = await harness.command("status", user=fake.member, channel_id=fake.random_id)
    assert f"Tokens: {tokens_in:,} in, {tokens_out:,} out" in status.splitlines()


async def test_a_member_over_the_budget_cannot_retry_either(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """/retry calls the model too: it is admitted like a message, so a member over a limit
    gets the same reason, privately, and the answer shown stays as it was."""
    fake, api = harness.discord, harness.api
    clock = [NOW]
    await limited(harness, UsageLimits(user_tokens_per_day=1), clock)
    api.reply_text("The first answer.")
    await ask(harness, fake.member, "one")  # under the budget when asked; over it after
    reply = await harness.command("retry", user=fake.member, channel_id=fake.general_id)
    assert reply == (
        "⚠️ You have used your 1 tokens for today; you can continue at 00:00 UTC "
        "(in 16 h 0 min). This retry was not sent to the model."
    )
    assert api.request_count == 1
    assert harness.answers(fake.general_id)[-1].content == "The first answer."
    history = await harness.history(fake.general_id)
    assert [m["content"] for m in history][1:] == ["The first answer."]
    assert len(history) == 2
    await ask(harness, fake.admin, "an admin is not limited")
    await harness.command("retry", user=fake.admin, channel_id=fake.general_id)
    assert api.request_count == 3  # the admin's question and its retry
