"""The store's promises about token usage and usage limits, on both backends: sums that add
up, limits hit at exactly the configured count (also by two store clients at once, as two
processes would be) and lifted when their window passes. Time is the `now` each call is
given, so a test moves it forward without waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bot.store.base import SessionStore, StorePolicy
from bot.store.redis import RedisStore, usage_key
from bot.store.sqlite import SqliteStore
from bot.usage import (
    RATE,
    SERVER_BUDGET,
    USER_BUDGET,
    Account,
    Admission,
    Charge,
    Refusal,
    ServerUsage,
    SessionUsage,
    Totals,
    Usage,
    UsageLimits,
    day_of,
    days_back,
    next_day_at,
)

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC
TODAY = day_of(NOW)
ADA = Account("guild:1", "ada")
BOB = Account("guild:1", "bob")
OTHER_SERVER = Account("guild:2", "ada")


def charge(account: Account, tokens_in: int, tokens_out: int, **kw: object) -> Charge:
    session = str(kw.get("session", "default"))
    scope = str(kw.get("scope", "place:1"))
    estimated = bool(kw.get("estimated", False))
    day = str(kw.get("day", TODAY))
    return Charge(account, scope, session, Usage(tokens_in, tokens_out, estimated), day)


async def test_usage_adds_up_per_session_and_per_server_day(store: SessionStore) -> None:
    await store.record_usage(charge(ADA, 100, 20))
    await store.record_usage(charge(BOB, 50, 5))
    await store.record_usage(charge(ADA, 7, 3, session="other"))
    await store.record_usage(charge(ADA, 40, 10, estimated=True))
    await store.record_usage(charge(OTHER_SERVER, 1000, 1000, scope="place:2"))
    await store.record_usage(charge(ADA, 9, 1, day=days_back(NOW, 2)[1]))  # yesterday

    # default: 100+50+40+9 in, 20+5+10+1 out; 50 of them estimated; 175 of them today
    assert await store.session_usage("place:1", "default", "guild:1", TODAY) == SessionUsage(
        199, 36, 50, today=225, server_today=235
    )
    assert await store.session_usage("place:1", "unused", "guild:1", TODAY) == SessionUsage(
        0, 0, 0, today=0, server_today=235
    )
    report = await store.server_usage("guild:1", days_back(NOW, 30))
    assert report == ServerUsage(
        today=Totals(197, 38, 50),
        period=Totals(206, 39, 50),
        top_users=[("ada", 190), ("bob", 55)],
    )
    assert (await store.server_usage("guild:3", days_back(NOW, 30))) == ServerUsage()


async def test_the_report_covers_only_the_days_asked(store: SessionStore) -> None:
    month = days_back(NOW, 30)
    await store.record_usage(charge(ADA, 10, 0, day=month[29]))  # 29 days ago: counted
    await store.record_usage(charge(BOB, 20, 0, day=days_back(NOW, 31)[30]))  # 30 days ago
    report = await store.server_usage("guild:1", month)
    assert report.today == Totals() and report.period == Totals(10, 0, 0)
    assert report.top_users == [("ada", 10)]


async def test_the_message_rate_admits_exactly_its_count_and_lifts_after_a_minute(
    store: SessionStore,
) -> None:
    limits = UsageLimits(messages_per_minute=3)

    async def ask(message: str, at: float) -> Refusal | None:
        return await store.admit(Admission(ADA, message, NOW + at, limits))

    assert [await ask(m, i) for i, m in enumerate(["m1", "m2", "m3"])] == [None] * 3
    assert await ask("m4", 10) == Refusal(RATE, NOW + 60, notify=True)
    assert await ask("m5", 11) == Refusal(RATE, NOW + 60, notify=False)  # told once a minute
    assert await ask("m2", 12) is None  # checked again (another process): admitted before
    assert await store.admit(Admission(BOB, "b1", NOW + 12, limits)) is None  # per member
    assert await ask("m6", 59.5) == Refusal(RATE, NOW + 60, notify=False)
    assert await ask("m6", 60.5) is None  # m1 left the window
    assert await ask("m7", 61.5) is None  # and m2
    assert await ask("m8", 62.5) is None  # and m3
    assert await ask("m9", 70.5) == Refusal(RATE, NOW + 120.5, notify=True)  # told a minute ago
    assert await store.admit(Admission(OTHER_SERVER, "x", NOW + 71, limits)) is None


async def test_daily_budgets_refuse_until_the_next_day(store: SessionStore) -> None:
    limits = UsageLimits(user_tokens_per_day=100, server_tokens_per_day=150)
    midnight = next_day_at(NOW)
    assert await store.admit(Admission(ADA, "a1", NOW, limits)) is None
    await store.record_usage(charge(ADA, 90, 10))  # ada: 100, the server: 100
    assert await store.admit(Admission(ADA, "a2", NOW + 1, limits)) == Refusal(
        USER_BUDGET, midnight, notify=True
    )
    assert await store.admit(Admission(BOB, "b1", NOW + 2, limits)) is None
    await store.record_usage(charge(BOB, 49, 0))  # the server: 149
    assert await store.admit(Admission(BOB, "b2", NOW + 3, limits)) is None
    await store.record_usage(charge(BOB, 1, 0))  # the server: 150
    assert await store.admit(Admission(BOB, "b3", NOW + 4, limits)) == Refusal(
        SERVER_BUDGET, midnight, notify=True
    )
    assert await store.admit(Admission(OTHER_SERVER, "o1", NOW + 5, limits)) is None
    tomorrow = midnight + 1
    assert await store.admit(Admission(ADA, "a3", tomorrow, limits)) is None
    assert await store.admit(Admission(BOB, "b4", tomorrow, limits)) is None


@pytest.fixture(params=["redis", "sqlite"])
async def two_clients(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path, policy: StorePolicy
) -> AsyncIterator[list[SessionStore]]:
    """Two stores over the same data, as two processes have."""
    stores: list[SessionStore] = []
    for _ in range(2):
        if request.param == "redis":
            stores.append(RedisStore.from_url(redis_url, policy))
        else:
            stores.append(SqliteStore(tmp_path / "shared.sqlite3", policy))
    yield stores
    for store in stores:
        await store.close()


async def test_two_clients_at_once_admit_exactly_the_limit(
    two_clients: list[SessionStore],
) -> None:
    limits = UsageLimits(messages_per_minute=4)
    asked = [
        two_clients[i % 2].admit(Admission(ADA, f"m{i}", NOW + i / 100, limits)) for i in range(12)
    ]
    refusals = await asyncio.gather(*asked)
    assert sum(r is None for r in refusals) == 4
    assert sum(r is not None and r.notify for r in refusals) == 1


async def test_junk_in_the_limits_counters_starts_them_again(
    raw_redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    limits = UsageLimits(messages_per_minute=1, user_tokens_per_day=10)
    await raw_redis.set(usage_key("guild:1", "rate:ada"), "junk")
    await raw_redis.sadd(usage_key("guild:1", f"day:{TODAY}"), "junk")
    await raw_redis.hset(usage_key("guild:1", "notice:ada"), "junk", "1")
    assert await raw_redis_store.admit(Admission(ADA, "a1", NOW, limits)) is None
    assert await raw_redis_store.admit(Admission(ADA, "a2", NOW, limits)) == Refusal(
        RATE, NOW + 60, notify=True
    )


async def test_a_turns_save_charges_its_session_once_whatever_the_outcome(
    store: SessionStore,
) -> None:
    """The session's share of a turn's charge goes with its save (the server's day is
    charged on its own): once, even when the save is repeated (its reply was lost), and also
    when there was nothing to keep (the lock lost, the run failed)."""
    from bot.store.base import Ticket

    saved = await store.begin_turn("place:1", Ticket.now(), 100_000, 10_000)
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    first = charge(ADA, 100, 20)
    assert await store.finish_turn(saved, said, "m1", first)
    assert await store.finish_turn(saved, said, "m1", first)  # a repeat: nothing twice
    await store.record_usage(first, session=False)
    assert await store.session_usage("place:1", "default", "guild:1", TODAY) == SessionUsage(
        100, 20, 0, today=120, server_today=120
    )
    lost = await store.begin_turn("place:1", Ticket.now(), 100_000, 10)
    await asyncio.sleep(0.05)  # its lock lapses, and another turn takes the session
    other = await store.begin_turn("place:1", Ticket.now(), 100_000, 10_000)
    late = charge(ADA, 10, 5, estimated=True)
    assert not await store.finish_turn(lost, said, "m2", late)  # stale: not saved, charged
    assert await store.finish_turn(other, [], None, charge(ADA, 1, 1))  # a failed run
    usage = await store.session_usage("place:1", "default", "guild:1", TODAY)
    assert (usage.input_tokens, usage.output_tokens, usage.estimated_tokens) == (111, 26, 15)
    assert usage.today == 120  # the server's day is the caller's to charge
