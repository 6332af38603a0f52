"""The session store's contract, run against both backends (real Redis and SQLite)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bot.errors import (
    InvalidInput,
    MessageTooLarge,
    SessionBusy,
    SessionLimit,
    SummaryInProgress,
    UnknownSession,
)
from bot.store.base import (
    LAST_ANSWERED_OPTION,
    PERSONA_OPTION,
    AlreadyClaimed,
    Message,
    NotedPlace,
    SessionSettings,
    SessionStore,
    StorePolicy,
    Summary,
    Ticket,
    Turn,
    encode_message,
)
from bot.store.redis import RedisStore, places_key, session_key
from bot.store.sqlite import SqliteStore

BIG = 1_000_000
TOOL_ROUND: list[Message] = [
    {"role": "user", "content": "what's the weather?"},
    {
        "role": "assistant",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny. ☀️"},
]


async def save_turn(
    store: SessionStore, scope: str, *messages: Message, ref: str | None = None
) -> Turn:
    turn = await store.begin_turn(scope, Ticket.now(), BIG, 10_000)
    assert await store.finish_turn(turn, list(messages), ref)
    return turn


async def begin_when_free(
    store: SessionStore, scope: str, ticket: Ticket, lock_ms: int = 10_000
) -> Turn:
    """Begin a turn as soon as the scope's lock (and the ticket's claim) lapses, asking
    every 10 ms for up to a minute, always with the same ticket (a new one would queue
    behind the earlier asks)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await store.begin_turn(scope, ticket, BIG, lock_ms)
        except (SessionBusy, AlreadyClaimed) as busy:
            if isinstance(busy, AlreadyClaimed) and busy.answered:
                raise
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def test_untouched_scope_reports_an_empty_default(store: SessionStore) -> None:
    session = await store.current_session("fresh")
    assert (session.name, session.message_count) == ("default", 0)
    assert await store.list_sessions("fresh") == []


async def test_a_turn_stores_messages_exactly_as_given(store: SessionStore) -> None:
    await save_turn(store, "s1", *TOOL_ROUND)
    assert await store.read_history("s1", "default") == TOOL_ROUND
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.recent == TOOL_ROUND
    assert turn.session.message_count == 4
    await store.finish_turn(turn, [])


async def test_begin_returns_only_the_newest_messages_within_budget(store: SessionStore) -> None:
    messages = [{"role": "user", "content": f"message {i:03}"} for i in range(50)]
    await save_turn(store, "s1", *messages)
    size = len(encode_message(messages[0]).encode())
    turn = await store.begin_turn("s1", Ticket.now(), size * 5 + size // 2, 10_000)
    assert turn.recent == messages[-5:]
    assert turn.session.message_count == 50
    await store.finish_turn(turn, [])


async def test_a_locked_session_is_busy_until_the_turn_finishes(store: SessionStore) -> None:
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    waiting = Ticket.now()
    with pytest.raises(SessionBusy):
        await store.begin_turn("s1", waiting, BIG, 10_000)
    other_scope = await store.begin_turn("s2", Ticket.now(), BIG, 10_000)  # never waits
    await store.finish_turn(other_scope, [])
    assert await store.finish_turn(turn, [{"role": "user", "content": "hi"}])
    second = await store.begin_turn("s1", waiting, BIG, 10_000)
    assert second.recent == [{"role": "user", "content": "hi"}]
    await store.finish_turn(second, [])


async def test_a_crashed_holders_lock_expires(store: SessionStore) -> None:
    await store.begin_turn("s1", Ticket.now(), BIG, 50)  # never finished: its process "crashed"
    await asyncio.sleep(0.1)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert await store.finish_turn(turn, [{"role": "user", "content": "after"}])


async def test_a_turn_that_lost_its_lock_saves_nothing(store: SessionStore) -> None:
    stale = await store.begin_turn("s1", Ticket.now(), BIG, 50)
    await asyncio.sleep(0.1)
    current = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert not await store.finish_turn(stale, [{"role": "user", "content": "stale"}])
    assert await store.finish_turn(current, [{"role": "user", "content": "current"}])
    assert await store.read_history("s1", "default") == [{"role": "user", "content": "current"}]


async def test_extend_lock_keeps_a_long_turn_alive(store: SessionStore) -> None:
    """A renewed lock outlives its first term: when a lock of the same term, taken after
    it but not renewed, has lapsed, the renewed one still holds."""
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 2_000)
    assert await store.extend_lock(turn, 60_000)
    await store.begin_turn("unrenewed", Ticket.now(), BIG, 2_000)
    await begin_when_free(store, "unrenewed", Ticket.now())
    with pytest.raises(SessionBusy):
        await store.begin_turn("s1", Ticket(order=0), BIG, 100)
    assert await store.extend_lock(turn, 60_000)
    assert await store.finish_turn(turn, [])


async def test_stored_history_is_capped_to_the_newest(store: SessionStore, policy: object) -> None:
    cap = 1000
    batch = [{"role": "user", "content": str(i)} for i in range(cap + 7)]
    await save_turn(store, "s1", *batch)
    history = await store.read_history("s1", "default")
    assert history == batch[-cap:]


async def test_sessions_are_named_switched_and_kept_apart(store: SessionStore) -> None:
    await save_turn(store, "s1", {"role": "user", "content": "in default"})
    settings = SessionSettings("anthropic/claude-opus-4-5-20251101", ("org/tool",))
    created = await store.create_session("s1", "work", settings)
    assert (created.name, created.settings, created.message_count) == ("work", settings, 0)
    await save_turn(store, "s1", {"role": "user", "content": "in work"})
    assert (await store.current_session("s1")).name == "work"
    with pytest.raises(InvalidInput):
        await store.create_session("s1", "default", settings)
    assert (await store.current_session("s1")).name == "work"
    with pytest.raises(UnknownSession):
        await store.switch_session("s1", "nope")
    loaded = await store.switch_session("s1", "default")
    assert (loaded.name, loaded.message_count) == ("default", 1)
    names = [s.name for s in await store.list_sessions("s1")]
    assert sorted(names) == ["default", "work"]
    assert names[0] == "default"  # most recently used first
    assert await store.read_history("s1", "work") == [{"role": "user", "content": "in work"}]


async def test_clear_empties_history_and_keeps_settings(store: SessionStore) -> None:
    await save_turn(store, "s1", *TOOL_ROUND)
    settings = SessionSettings("google/gemini-3-pro-preview", ("https://mcp.example.com/x",))
    await store.update_settings("s1", settings)
    cleared = await store.clear_session("s1")
    assert (cleared.message_count, cleared.settings) == (0, settings)
    assert await store.read_history("s1", "default") == []


async def test_settings_persist_per_session(store: SessionStore) -> None:
    settings = SessionSettings("google/gemini-3-pro-preview", ("org/a", "org/b@v2"))
    await store.update_settings("s1", settings)
    assert (await store.current_session("s1")).settings == settings
    assert (await store.current_session("s2")).settings == SessionSettings("openai/gpt-5.1")


async def test_forget_message_removes_that_user_message(store: SessionStore) -> None:
    answer = {"role": "assistant", "content": "hello"}
    await save_turn(store, "s1", {"role": "user", "content": "keep"}, answer, ref="m1")
    await save_turn(store, "s1", {"role": "user", "content": "drop"}, answer, ref="m2")
    assert await store.forget_message("s1", "m2")
    assert not await store.forget_message("s1", "m2")
    assert not await store.forget_message("s2", "m1")
    assert await store.read_history("s1", "default") == [
        {"role": "user", "content": "keep"},
        answer,
        answer,
    ]


@pytest.mark.parametrize("policy", [StorePolicy("openai/gpt-5.1", history_cap=6)])
async def test_a_message_still_in_history_can_be_forgotten_however_long_the_session(
    store: SessionStore,
) -> None:
    """Deleting a Discord message removes it from history for as long as it is stored;
    what the cap already dropped is simply not found, and the store keeps no more of
    these references than the history holds messages."""
    answer = {"role": "assistant", "content": "noted"}
    for i in range(43):
        await save_turn(store, "s1", {"role": "user", "content": f"q{i}"}, answer, ref=f"m{i}")
    if isinstance(store, RedisStore):
        kept = await store._redis.hlen(session_key("s1", "default", "refs"))
        assert kept <= 6
    assert not await store.forget_message("s1", "m39")  # the cap dropped it already
    for i in (40, 41, 42):
        assert await store.forget_message("s1", f"m{i}")
    assert await store.read_history("s1", "default") == [answer] * 3


@pytest.mark.parametrize("policy", [StorePolicy("openai/gpt-5.1", history_cap=5)])
async def test_after_a_forget_at_the_cap_older_messages_can_still_be_forgotten(
    store: SessionStore,
) -> None:
    """A forgotten message frees its place, so an older one stays stored longer than the
    cap alone would allow; it must stay forgettable too."""
    answer = {"role": "assistant", "content": "noted"}
    for i in range(11):
        await save_turn(store, "s1", {"role": "user", "content": f"q{i}"}, answer, ref=f"m{i}")
    assert await store.forget_message("s1", "m10")
    await save_turn(store, "s1", {"role": "user", "content": "q11"}, answer, ref="m11")
    assert {"role": "user", "content": "q9"} in await store.read_history("s1", "default")
    assert await store.forget_message("s1", "m9")
    assert {"role": "user", "content": "q9"} not in await store.read_history("s1", "default")


async def test_import_replaces_named_sessions_whole(store: SessionStore) -> None:
    await save_turn(store, "s1", {"role": "user", "content": "old"})
    imported = {"default": TOOL_ROUND, "other": [{"role": "user", "content": "x"}]}
    await store.import_sessions("s1", imported, SessionSettings("openai/gpt-5.1"))
    assert await store.read_history("s1", "default") == TOOL_ROUND
    assert await store.read_history("s1", "other") == [{"role": "user", "content": "x"}]
    assert {s.name for s in await store.list_sessions("s1")} == {"default", "other"}


REFERENCE_NAMES = [
    "my project",
    "notes: week 1",
    "ada@work",
    "100% {done}!",
    "café ☕ 日本語",
    "a%20b",  # looks like an escape, and is a name of its own
    "x" * 100,
]


async def test_every_name_the_reference_makes_works_like_any_other(store: SessionStore) -> None:
    """Names with spaces, ':', '@', '%', braces or emoji are created, listed, loaded, used
    for a turn, read back and imported under exactly the name given."""
    for name in REFERENCE_NAMES:
        created = await store.create_session("s1", name, SETTINGS)
        assert created.name == name
        turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
        assert turn.session.name == name
        assert await store.finish_turn(turn, [{"role": "user", "content": name}])
    await store.switch_session("s1", "my project")
    assert (await store.current_session("s1")).name == "my project"
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)  # what /retry and /undo act on
    assert exchange is not None
    assert list(exchange.messages) == [{"role": "user", "content": "my project"}]
    await store.finish_turn(turn, [])
    assert sorted(s.name for s in await store.list_sessions("s1")) == sorted(REFERENCE_NAMES)
    for name in REFERENCE_NAMES:
        assert await store.read_history("s1", name) == [{"role": "user", "content": name}]
    imported = await store.import_sessions("s2", {n: TOOL_ROUND for n in REFERENCE_NAMES}, SETTINGS)
    assert imported == {n: len(TOOL_ROUND) for n in REFERENCE_NAMES}
    assert (await store.current_session("s2")).name == REFERENCE_NAMES[0]
    assert sorted(s.name for s in await store.list_sessions("s2")) == sorted(REFERENCE_NAMES)
    assert await store.read_history("s2", "a%20b") == TOOL_ROUND
    assert await store.read_history("s2", "a b") == []  # never confused with "a%20b"
    with pytest.raises(InvalidInput, match="'ada@work' exists already"):
        await store.create_session("s1", "ada@work", SETTINGS)
    assert await store.delete_session("s1", "ada@work") is None  # not the current one
    assert "ada@work" not in {s.name for s in await store.list_sessions("s1")}
    assert await store.read_history("s1", "ada@work") == []


async def test_scope_options_are_kept_per_scope(store: SessionStore) -> None:
    assert await store.scope_option("s1", "reply_mode") is None
    await store.set_scope_option("s1", "reply_mode", "all")
    await store.set_scope_option("s1", "reply_mode", "threads")
    assert await store.scope_option("s1", "reply_mode") == "threads"
    assert await store.scope_option("s2", "reply_mode") is None


async def test_a_scope_option_set_to_none_is_gone(store: SessionStore) -> None:
    await store.set_scope_option("s1", "reply_mode", "all")
    await store.set_scope_option("s1", PERSONA_OPTION, "You are a pirate.")
    await store.set_scope_option("s1", PERSONA_OPTION, None)
    assert await store.scope_option("s1", PERSONA_OPTION) is None
    assert await store.scope_option("s1", "reply_mode") == "all"  # the others stay
    await store.set_scope_option("s2", PERSONA_OPTION, None)  # never set: nothing happens
    assert await store.scope_option("s2", PERSONA_OPTION) is None


async def test_a_turn_reads_its_scopes_persona_as_it_begins(store: SessionStore) -> None:
    """Read in the turn's own step, so a change by any process counts from the next turn."""
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.persona is None
    await store.finish_turn(turn, [{"role": "user", "content": "hi"}])
    persona = "You are Captain Hook.\n\tYou answer in rhymes, ☠️ included."
    await store.set_scope_option("s1", PERSONA_OPTION, persona)
    await store.set_scope_option("s2", PERSONA_OPTION, "Another place's persona.")
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.persona == persona
    assert turn.recent == [{"role": "user", "content": "hi"}]
    await store.finish_turn(turn, [])
    await store.set_scope_option("s1", PERSONA_OPTION, None)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.persona is None
    await store.finish_turn(turn, [])
    turn = await store.begin_turn("s3", Ticket.now(), BIG, 10_000)
    assert turn.persona is None  # personas stay in their place
    await store.finish_turn(turn, [])


async def test_a_turn_knows_the_last_message_answered_in_its_place(store: SessionStore) -> None:
    """Read in the turn's own step (a mention's channel context starts after it), as it was
    when the turn began: the turn's own message counts from the next turn."""
    turn = await store.begin_turn("s1", Ticket(order=1, claim="101"), BIG, 10_000)
    assert turn.last_answered is None
    await store.finish_turn(turn, [{"role": "user", "content": "hi"}], "101")
    turn = await store.begin_turn("s1", Ticket(order=2, claim="102"), BIG, 10_000)
    assert turn.last_answered == 101
    await store.finish_turn(turn, [], "102")
    await store.claim("s1", "1000", "outside", 10_000)  # answered outside a turn (threads mode)
    await store.settle_claim("s1", "1000", "outside", answered=True)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.last_answered == 1000
    await store.finish_turn(turn, [])
    turn = await store.begin_turn("s2", Ticket.now(), BIG, 10_000)
    assert turn.last_answered is None  # each place has its own
    await store.finish_turn(turn, [])


async def test_a_scope_option_is_swapped_by_one_caller_only(store: SessionStore) -> None:
    """What makes a once-only act (naming a thread) once across processes and retries."""
    assert not await store.swap_scope_option("s1", "title", "named:x", "titled")
    assert await store.scope_option("s1", "title") is None  # nothing to swap: nothing set
    await store.set_scope_option("s1", "title", "named:x")
    assert not await store.swap_scope_option("s1", "title", "named:y", "titled")
    assert await store.scope_option("s1", "title") == "named:x"
    tries = [store.swap_scope_option("s1", "title", "named:x", "titled") for _ in range(5)]
    assert sorted(await asyncio.gather(*tries)) == [False] * 4 + [True]
    assert await store.scope_option("s1", "title") == "titled"
    assert await store.scope_option("s2", "title") is None


async def test_idle_sessions_expire_after_the_ttl(
    store: SessionStore, redis_url: str, tmp_path: object
) -> None:
    """Until the idle session is gone, the busy one is used every half second: a turn
    stalled by a slow machine for up to 2.5 s still comes within the 3 s TTL."""
    from bot.store.redis import RedisStore
    from bot.store.sqlite import SqliteStore

    policy = StorePolicy(default_model="openai/gpt-5.1", ttl_seconds=3)
    if isinstance(store, RedisStore):
        expiring: SessionStore = RedisStore.from_url(redis_url, policy)
    else:
        expiring = SqliteStore(tmp_path / "ttl.sqlite3", policy)  # type: ignore[operator]
    await save_turn(expiring, "idle", {"role": "user", "content": "old"})
    await save_turn(expiring, "busy", {"role": "user", "content": "old"})
    deadline, uses = time.monotonic() + 60, 0
    while await expiring.list_sessions("idle"):
        assert time.monotonic() < deadline, "the idle session was never dropped"
        await asyncio.sleep(0.5)
        await save_turn(expiring, "busy", {"role": "user", "content": "new"})
        uses += 1
    assert await expiring.read_history("idle", "default") == []
    kept = await expiring.read_history("busy", "default")
    assert [m["content"] for m in kept] == ["old"] + ["new"] * uses  # in use: all kept
    await expiring.close()


async def test_turns_start_in_ticket_order_whoever_asks_first(store: SessionStore) -> None:
    first, second, third = (Ticket(order=n) for n in (10, 20, 30))
    holder = await store.begin_turn("s1", Ticket(order=1), BIG, 10_000)
    for ticket in (third, second, first):  # they arrive out of order while s1 is busy
        with pytest.raises(SessionBusy):
            await store.begin_turn("s1", ticket, BIG, 10_000)
    await store.finish_turn(holder, [])
    for early, late in ((first, second), (second, third)):
        with pytest.raises(SessionBusy):
            await store.begin_turn("s1", late, BIG, 10_000)
        turn = await store.begin_turn("s1", early, BIG, 10_000)
        await store.finish_turn(turn, [{"role": "user", "content": str(early.order)}])
    last = await store.begin_turn("s1", third, BIG, 10_000)
    await store.finish_turn(last, [{"role": "user", "content": "30"}])
    history = await store.read_history("s1", "default")
    assert [m["content"] for m in history] == ["10", "20", "30"]


async def test_a_dead_waiters_place_lapses(store: SessionStore) -> None:
    from bot.store import base

    ghost = Ticket(order=1)
    holder = await store.begin_turn("s1", Ticket(order=0), BIG, 10_000)
    with pytest.raises(SessionBusy):
        await store.begin_turn("s1", ghost, BIG, 10_000)  # and never asks again
    await store.finish_turn(holder, [])
    with pytest.raises(SessionBusy):
        await store.begin_turn("s1", Ticket(order=2), BIG, 10_000)
    await asyncio.sleep(base.TICKET_TTL_MS / 1000 + 0.2)
    turn = await store.begin_turn("s1", Ticket(order=3), BIG, 10_000)
    assert await store.finish_turn(turn, [])


async def test_a_claimed_message_starts_only_one_turn(store: SessionStore) -> None:
    mine = Ticket(order=1, claim="msg-1")
    turn = await store.begin_turn("s1", mine, BIG, 10_000)
    with pytest.raises(AlreadyClaimed):
        await store.begin_turn("s1", Ticket(order=1, claim="msg-1"), BIG, 10_000)
    await store.finish_turn(turn, [])
    with pytest.raises(AlreadyClaimed):  # also after the first turn ended
        await store.begin_turn("s1", Ticket(order=2, claim="msg-1"), BIG, 10_000)
    await store.claim("s1", "msg-2", "outside", 10_000)
    await store.claim("s1", "msg-2", "outside", 10_000)  # renewing one's own lease
    with pytest.raises(AlreadyClaimed):
        await store.claim("s1", "msg-2", "other", 10_000)
    with pytest.raises(AlreadyClaimed):
        await store.claim("s1", "msg-1", "other", 10_000)
    retry = Ticket(order=5, claim="msg-3")  # a turn that waited keeps its claim
    blocker = await store.begin_turn("s1", Ticket(order=4), BIG, 10_000)
    with pytest.raises(SessionBusy):
        await store.begin_turn("s1", retry, BIG, 10_000)
    await store.finish_turn(blocker, [])
    assert await store.finish_turn(await store.begin_turn("s1", retry, BIG, 10_000), [])


async def answered_or_in_progress(store: SessionStore, scope: str, claim: str) -> str:
    """What another process learns when it tries the claim: `answered`, `in progress`, or
    `free` (it takes it over; the test hands it back at once)."""
    try:
        await store.claim(scope, claim, "prober", 60_000)
    except AlreadyClaimed as claimed:
        return "answered" if claimed.answered else "in progress"
    await store.settle_claim(scope, claim, "prober", answered=False)
    return "free"


async def test_a_claim_is_a_lease_until_its_message_is_answered(store: SessionStore) -> None:
    """A process that dies mid-turn holds its message only as long as its lock; once the
    turn saved (or told the user it failed) the claim lasts, and says so."""
    lease_ms = 600
    dying = await store.begin_turn("s1", Ticket(order=1, claim="m1"), BIG, 2_000)
    assert await store.extend_lock(dying, 60_000)  # a live turn renews its lease with its lock
    assert await answered_or_in_progress(store, "s1", "m1") == "in progress"
    with pytest.raises(AlreadyClaimed) as refused:
        await store.begin_turn("s1", Ticket(order=1, claim="m1"), BIG, lease_ms)
    assert not refused.value.answered
    await store.claim("s2", "m1", "unrenewed", 2_000)
    deadline = time.monotonic() + 60
    while await answered_or_in_progress(store, "s2", "m1") != "free":  # a lease of the same
        assert time.monotonic() < deadline  # term, not renewed, lapsed...
        await asyncio.sleep(0.01)
    assert await answered_or_in_progress(store, "s1", "m1") == "in progress"  # ...not this one
    assert await store.extend_lock(dying, lease_ms)  # then its process dies
    survivor = await begin_when_free(store, "s1", Ticket(order=1, claim="m1"), lease_ms)
    assert await store.finish_turn(survivor, [{"role": "user", "content": "m1"}], "m1")
    await asyncio.sleep(lease_ms / 1000 + 0.3)
    assert await answered_or_in_progress(store, "s1", "m1") == "answered"
    assert [m["content"] for m in await store.read_history("s1", "default")] == ["m1"]
    assert await store.scope_option("s1", LAST_ANSWERED_OPTION) == "m1"

    failed = await store.begin_turn("s1", Ticket(order=2, claim="m2"), BIG, lease_ms)
    await store.finish_turn(failed, [])  # the model failed and the user was told
    await asyncio.sleep(lease_ms / 1000 + 0.3)
    assert await answered_or_in_progress(store, "s1", "m2") == "answered"
    assert await store.scope_option("s1", LAST_ANSWERED_OPTION) == "m2"


async def test_a_claim_handed_back_is_free_at_once(store: SessionStore) -> None:
    """A process shutting down hands back what it could not finish: another process (or the
    next start) answers it without waiting for the lease, and nothing was recorded."""
    turn = await store.begin_turn("s1", Ticket(order=7, claim="m7"), BIG, 60_000)
    await store.settle_claim("s1", "m7", turn.lock_token, answered=False)
    await store.finish_turn(turn, [])
    assert await answered_or_in_progress(store, "s1", "m7") == "free"
    assert await store.scope_option("s1", LAST_ANSWERED_OPTION) is None
    await store.claim("s1", "m8", "outside", 60_000)  # the threads mode, outside a turn
    await store.settle_claim("s1", "m8", "someone else", answered=False)  # not theirs
    assert await answered_or_in_progress(store, "s1", "m8") == "in progress"
    await store.settle_claim("s1", "m8", "outside", answered=True)
    assert await answered_or_in_progress(store, "s1", "m8") == "answered"
    assert await store.scope_option("s1", LAST_ANSWERED_OPTION) == "m8"
    await store.claim("s1", "m10", "outside", 60_000)  # a newer id, written with more digits
    await store.settle_claim("s1", "m10", "outside", answered=True)
    await store.claim("s1", "m9", "outside", 60_000)
    await store.settle_claim("s1", "m9", "outside", answered=True)
    assert await store.scope_option("s1", LAST_ANSWERED_OPTION) == "m10"


async def test_places_answered_recently_are_remembered(store: SessionStore) -> None:
    assert await store.recent_places() == []
    for scope in ("a", "b", "a", "c"):
        await store.note_place(scope)
    assert [place.scope for place in await store.recent_places()] == ["c", "a", "b"]


async def test_a_place_is_remembered_with_its_server(store: SessionStore) -> None:
    """Noted without one (as before places kept it), its server is unknown until it is
    noted with one; then kept (noting it again without one does not forget it), and gone
    with the place."""
    await store.note_place("old")
    await store.note_place("a", "guild:1")
    await store.note_place("b", "dm:2")
    await store.note_place("a")
    assert await store.recent_places() == [
        NotedPlace("a", "guild:1"),
        NotedPlace("b", "dm:2"),
        NotedPlace("old", None),
    ]
    await store.note_place("old", "guild:3")
    await store.forget_place("a")
    assert await store.recent_places() == [NotedPlace("old", "guild:3"), NotedPlace("b", "dm:2")]


MCP_JUNK = {"settings": '"x"', "settings-object": "{}", "settings-numbers": "[1]"}
"""MCP values the reader refuses: /clear's repair once kept the last two."""


async def damage(store: SessionStore, scope: str, what: str, name: str = "default") -> None:
    """Write what a bug, a crash mid-upgrade or a person with redis-cli might leave."""
    from bot.store.redis import RedisStore, session_key

    if isinstance(store, RedisStore):
        redis = store._redis  # the test reaches past the store on purpose, to break it
        if what == "message":
            await redis.rpush(session_key(scope, name, "messages"), "{not json")
        elif what == "meta-type":
            meta = session_key(scope, name, "meta")
            await redis.delete(meta)
            await redis.set(meta, "not a hash")
        else:
            await redis.hset(session_key(scope, name, "meta"), "mcp", MCP_JUNK[what])
        return
    db = store._db  # type: ignore[attr-defined]
    if what == "message":
        db.execute("INSERT INTO messages (scope, name, body) VALUES (?, ?, '[1')", (scope, name))
    elif what == "meta-type":  # SQLite's columns are typed: text where a time belongs
        db.execute(
            "UPDATE sessions SET created = 'yesterday' WHERE scope = ? AND name = ?", (scope, name)
        )
    else:
        db.execute(
            "UPDATE sessions SET mcp = ? WHERE scope = ? AND name = ?",
            (MCP_JUNK[what], scope, name),
        )


SESSION_DAMAGE = ["message", "settings", "settings-object", "settings-numbers", "meta-type"]


@pytest.mark.parametrize("what", SESSION_DAMAGE)
async def test_a_damaged_session_fails_alone_and_clear_repairs_it(
    store: SessionStore, what: str
) -> None:
    from bot.errors import CorruptSession

    await save_turn(store, "bad", {"role": "user", "content": "fine"})
    await save_turn(store, "good", {"role": "user", "content": "fine"})
    await damage(store, "bad", what)
    with pytest.raises(CorruptSession):
        await store.begin_turn("bad", Ticket.now(), BIG, 10_000)
    await save_turn(store, "good", {"role": "user", "content": "still fine"})
    cleared = await store.clear_session("bad")
    assert cleared.message_count == 0
    await save_turn(store, "bad", {"role": "user", "content": "repaired"})  # nothing stuck
    assert (await store.current_session("bad")).message_count == 1


@pytest.mark.parametrize("what", SESSION_DAMAGE)
async def test_a_damaged_session_that_is_not_current_leaves_the_place_working(
    store: SessionStore, what: str
) -> None:
    """It is listed as unreadable; the place's turns, `/new` and the other sessions work."""
    from bot.commands import Commands

    await save_turn(store, "s1", {"role": "user", "content": "old"})
    await store.create_session("s1", "work", SessionSettings("openai/gpt-5.1"))
    await save_turn(store, "s1", {"role": "user", "content": "work"})
    await damage(store, "s1", what, name="default")
    listed = {s.name: s.readable for s in await store.list_sessions("s1")}
    summary_damaged = what != "message"  # a bad message shows only when the history is read
    assert listed == {"default": not summary_damaged, "work": True}
    commands = Commands(store, ("openai/gpt-5.1",), "openai/gpt-5.1")
    assert ("default (unreadable" in await commands.list("s1")) == summary_damaged
    assert await commands.new("s1") == "Started new session: chat-1"
    assert (await store.switch_session("s1", "work")).message_count == 1
    await save_turn(store, "s1", {"role": "user", "content": "still works"})


async def test_saving_the_same_turn_twice_stores_it_once(store: SessionStore) -> None:
    """A save repeated because its reply was lost (a timeout) must not duplicate the turn."""
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert await store.finish_turn(turn, answer, "m1")
    assert await store.finish_turn(turn, answer, "m1")
    assert await store.read_history("s1", "default") == answer
    later = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)  # the lock is free
    assert await store.finish_turn(later, answer)
    assert len(await store.read_history("s1", "default")) == 4


LIMITS = StorePolicy(
    "openai/gpt-5.1", sessions_per_place=3, message_cap_bytes=300, history_cap_bytes=1000
)
SETTINGS = SessionSettings("openai/gpt-5.1")


@pytest.mark.parametrize("policy", [LIMITS])
async def test_a_place_keeps_at_most_its_session_limit(store: SessionStore) -> None:
    await save_turn(store, "s1", {"role": "user", "content": "hi"})  # `default`
    await store.create_session("s1", "a", SETTINGS)
    await store.create_session("s1", "b", SETTINGS)
    with pytest.raises(SessionLimit, match="already has 3 sessions"):
        await store.create_session("s1", "c", SETTINGS)
    with pytest.raises(SessionLimit):  # an import adding one is refused whole
        await store.import_sessions("s1", {"a": [], "c": []}, SETTINGS)
    assert (await store.current_session("s1")).name == "b"  # nothing changed
    assert sorted(s.name for s in await store.list_sessions("s1")) == ["a", "b", "default"]
    assert await store.read_history("s1", "default") == [{"role": "user", "content": "hi"}]
    await store.import_sessions("s1", {"a": [{"role": "user", "content": "x"}]}, SETTINGS)
    assert (await store.switch_session("s1", "a")).message_count == 1  # replacing is fine
    await store.create_session("s2", "c", SETTINGS)  # each place has its own limit


@pytest.mark.parametrize("policy", [LIMITS])
async def test_a_message_over_the_size_cap_is_refused_and_nothing_is_stored(
    store: SessionStore,
) -> None:
    small: Message = {"role": "user", "content": "fits"}
    big: Message = {"role": "user", "content": "x" * 300}
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    with pytest.raises(MessageTooLarge, match="over the limit of 1 KB per message"):
        await store.finish_turn(turn, [small, big], "m1")
    assert await store.finish_turn(turn, [])  # the caller releases the turn, as the engine does
    assert await store.read_history("s1", "default") == []
    with pytest.raises(MessageTooLarge, match=r"Message 1 of session 'x'.*nothing was imported"):
        await store.import_sessions("s1", {"w": [small], "x": [small, big]}, SETTINGS)
    assert [s.name for s in await store.list_sessions("s1")] == ["default"]


@pytest.mark.parametrize("policy", [LIMITS])
async def test_a_session_over_its_byte_cap_drops_its_oldest_messages(
    store: SessionStore,
) -> None:
    """As at the message-count cap: the newest messages that fit stay, and deleting a
    message finds it exactly while it is stored."""
    from bot.context import newest_within

    sent: list[Message] = []
    for i in range(12):
        question = {"role": "user", "content": f"q{i} " + "x" * 100}
        answer = {"role": "assistant", "content": f"a{i} " + "y" * (20 * (i % 4))}
        await save_turn(store, "s1", question, answer, ref=f"m{i}")
        sent += [question, answer]
    expected = newest_within(sent, 1000)
    assert 4 < len(expected) < len(sent)
    assert await store.read_history("s1", "default") == expected
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert (turn.recent, turn.session.message_count) == (expected, len(expected))
    await store.finish_turn(turn, [])
    kept = [i for i in range(12) if sent[2 * i] in expected]
    if isinstance(store, RedisStore):  # the refs of dropped messages went with them
        refs = await store._redis.hkeys(session_key("s1", "default", "refs"))
        assert sorted(refs) == sorted(f"m{i}" for i in kept)
    assert not await store.forget_message("s1", f"m{kept[0] - 1}")
    assert await store.forget_message("s1", f"m{kept[0]}")
    await store.import_sessions("s1", {"imported": sent}, SETTINGS)  # cut the same way
    assert await store.read_history("s1", "imported") == expected


async def expiring(
    store: SessionStore, redis_url: str, tmp_path: Path, ttl: int = 3, **limits: int
) -> SessionStore:
    """A store of the same backend over the same data, whose places expire after `ttl`
    (3 s: a test using a place every 0.2 s keeps it even on a machine stalled for 2 s)."""
    policy = StorePolicy("openai/gpt-5.1", ttl_seconds=ttl, **limits)
    if isinstance(store, RedisStore):
        return RedisStore.from_url(redis_url, policy)
    return SqliteStore(tmp_path / "ttl.sqlite3", policy)


async def leftovers(store: SessionStore) -> list[str]:
    """Whatever the store still holds for any place: keys, or rows of any table (not the
    record of places answered in lately, which a turn keeps up to date on Redis too)."""
    if isinstance(store, RedisStore):
        keys = await store._redis.keys("*")
        return sorted(str(key) for key in keys if key != places_key())
    db = store._db  # type: ignore[attr-defined]
    tables = ["scopes", "scope_options", "sessions", "messages", "claims", "queue"]
    return [t for t in tables if db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]]


async def test_everything_a_place_holds_expires_after_the_ttl_even_unused(
    store: SessionStore, redis_url: str, tmp_path: Path
) -> None:
    """Sessions made by /new, /load or an import expire without a turn; so do a place's
    options, claims, and the queue of turns that waited."""
    ttl = await expiring(store, redis_url, tmp_path)
    await ttl.create_session("made", "work", SETTINGS)
    await ttl.import_sessions("imported", {"x": [{"role": "user", "content": "hi"}]}, SETTINGS)
    forever = await expiring(store, redis_url, tmp_path, ttl=0)
    await save_turn(forever, "loaded", {"role": "user", "content": "old"})  # without a TTL
    await forever.close()
    await ttl.switch_session("loaded", "default")  # /load gives it one
    await ttl.set_scope_option("opted", "reply_mode", "all")
    await ttl.claim("claimed", "msg-1", "outside", 10_000)  # as the threads mode does
    await ttl.settle_claim("claimed", "msg-1", "outside", answered=True)
    holder = await ttl.begin_turn("queued", Ticket(order=1, claim="msg-2"), BIG, 10_000)
    with pytest.raises(SessionBusy):
        await ttl.begin_turn("queued", Ticket(order=2), BIG, 10_000)  # then never asks again
    assert await ttl.finish_turn(holder, [{"role": "user", "content": "q"}], "msg-2")
    assert await leftovers(ttl)
    deadline = asyncio.get_running_loop().time() + 60
    while await leftovers(ttl):
        assert asyncio.get_running_loop().time() < deadline, await leftovers(ttl)
        await ttl.list_sessions("made")  # the SQLite store purges from its calls
        await asyncio.sleep(0.2)
    assert await ttl.list_sessions("made") == []
    assert await ttl.scope_option("opted", "reply_mode") is None
    await ttl.close()


async def test_a_session_past_the_ttl_frees_its_place_under_the_limit(
    store: SessionStore, redis_url: str, tmp_path: Path
) -> None:
    """A place in use keeps its keys, but a session of it not used for the TTL is gone,
    and no longer counts toward the place's limit."""
    ttl = await expiring(store, redis_url, tmp_path, sessions_per_place=2)
    await ttl.create_session("p", "old", SETTINGS)
    await ttl.create_session("p", "current", SETTINGS)
    with pytest.raises(SessionLimit):
        await ttl.create_session("p", "new", SETTINGS)
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        await save_turn(ttl, "p", {"role": "user", "content": "still here"})
        try:
            await ttl.create_session("p", "new", SETTINGS)
            break
        except SessionLimit:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
    assert sorted(s.name for s in await ttl.list_sessions("p")) == ["current", "new"]
    assert await ttl.read_history("p", "current")  # the place's other session stayed
    await ttl.close()


QUESTION: list[Message] = [
    {"role": "user", "content": "old question"},
    {"role": "assistant", "content": "old answer"},
]


async def lapsed_turn(store: SessionStore, scope: str) -> Turn:
    """A turn whose process froze past its lock's lease (nobody took the lock since)."""
    turn = await store.begin_turn(scope, Ticket.now(), BIG, 1)
    await asyncio.sleep(0.05)  # at least 50 times the lease: it has lapsed
    return turn


async def test_a_lapsed_lock_cannot_be_renewed(store: SessionStore) -> None:
    """A frozen process that wakes must not revive its lock and pass for a live turn."""
    stale = await lapsed_turn(store, "s1")
    assert not await store.extend_lock(stale, 10_000)
    await store.clear_session("s1")
    assert not await store.finish_turn(stale, QUESTION, "m1")  # lost, not "cleared"


async def test_a_lapsed_turn_saves_when_the_session_did_not_change(store: SessionStore) -> None:
    await save_turn(store, "s1", {"role": "user", "content": "before"})
    stale = await lapsed_turn(store, "s1")
    assert await store.finish_turn(stale, QUESTION, "m1")
    assert await store.read_history("s1", "default") == [
        {"role": "user", "content": "before"},
        *QUESTION,
    ]


async def test_a_lapsed_turn_saves_nothing_after_a_clear(store: SessionStore) -> None:
    await save_turn(store, "s1", {"role": "user", "content": "before"})
    stale = await lapsed_turn(store, "s1")
    await store.clear_session("s1")
    assert not await store.finish_turn(stale, QUESTION, "m1")
    assert await store.read_history("s1", "default") == []
    await save_turn(store, "s1", {"role": "user", "content": "after"})  # nothing stuck


async def test_a_lapsed_turn_saves_nothing_after_another_turn(store: SessionStore) -> None:
    stale = await lapsed_turn(store, "s1")
    await save_turn(store, "s1", {"role": "user", "content": "newer"})
    assert not await store.finish_turn(stale, QUESTION, "m1")
    assert await store.read_history("s1", "default") == [{"role": "user", "content": "newer"}]


async def test_a_lapsed_turn_saves_nothing_after_a_clear_and_another_turn(
    store: SessionStore,
) -> None:
    """The session is back at the same length as when the turn began, but not the same."""
    await save_turn(store, "s1", {"role": "user", "content": "before"})
    stale = await lapsed_turn(store, "s1")
    await store.clear_session("s1")
    await save_turn(store, "s1", {"role": "user", "content": "newer"})
    assert not await store.finish_turn(stale, QUESTION, "m1")
    assert await store.read_history("s1", "default") == [{"role": "user", "content": "newer"}]


@pytest.mark.parametrize("change", ["switch", "import"])
async def test_a_lapsed_turn_saves_nothing_after_a_switch_or_import(
    store: SessionStore, change: str
) -> None:
    await save_turn(store, "s1", {"role": "user", "content": "before"})
    stale = await lapsed_turn(store, "s1")
    if change == "switch":
        await store.create_session("s1", "other", SessionSettings("openai/gpt-5.1"))
        await store.switch_session("s1", "default")  # back, but another session was current
        await save_turn(store, "s1", {"role": "user", "content": "newer"})
        kept = [{"role": "user", "content": "before"}, {"role": "user", "content": "newer"}]
    else:
        kept = [{"role": "user", "content": "imported"}]
        await store.import_sessions("s1", {"default": kept}, SessionSettings("openai/gpt-5.1"))
    assert not await store.finish_turn(stale, QUESTION, "m1")
    assert await store.read_history("s1", "default") == kept


async def test_a_turn_running_during_a_clear_saves_nothing(store: SessionStore) -> None:
    """/clear means "forget everything said until now": a turn that began before it is not
    kept, and says so; its lock is released."""
    from bot.store.base import SessionCleared

    await save_turn(store, "s1", {"role": "user", "content": "before"})
    live = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    await store.clear_session("s1")
    with pytest.raises(SessionCleared):
        await store.finish_turn(live, QUESTION, "m1")
    assert await store.read_history("s1", "default") == []
    assert not await store.forget_message("s1", "m1")
    await save_turn(store, "s1", {"role": "user", "content": "after"})  # the lock is free


async def test_a_turn_running_during_an_unrelated_deletion_is_saved(store: SessionStore) -> None:
    await save_turn(store, "s1", {"role": "user", "content": "other"}, ref="m0")
    live = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert await store.forget_message("s1", "m0")
    assert await store.finish_turn(live, QUESTION, "m1")
    assert await store.read_history("s1", "default") == QUESTION


async def test_a_counter_damaged_during_a_turn_stores_nothing_and_frees_the_lock(
    raw_redis_store: RedisStore,
) -> None:
    """Redis only (SQLite's counters are typed columns): a non-numeric `seq` once made the
    save push the messages and then fail, leaving the history longer and the lock held while
    the user was told nothing changed. Checked before writing now."""
    from bot.errors import CorruptSession

    store = raw_redis_store
    await save_turn(store, "s1", {"role": "user", "content": "before"})
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    await store._redis.hset(session_key("s1", "default", "meta"), "seq", "many")
    with pytest.raises(CorruptSession):
        await store.finish_turn(turn, QUESTION, "m1")
    assert await store.read_history("s1", "default") == [{"role": "user", "content": "before"}]
    with pytest.raises(CorruptSession):  # reported, not silently counted from zero
        await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    await store.clear_session("s1")
    await save_turn(store, "s1", {"role": "user", "content": "after"})  # the lock is free


async def test_a_message_deleted_while_its_turn_runs_is_not_stored(store: SessionStore) -> None:
    """The deletion comes before the save: neither the question nor its answer is kept,
    while a turn whose message was not deleted still saves (another one was)."""
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert not await store.forget_message("s1", "m1")  # not stored yet
    assert not await store.forget_message("s1", "m9")  # some other message, never stored
    assert await store.finish_turn(turn, QUESTION, "m1")
    assert await store.read_history("s1", "default") == []
    later = [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "yes"}]
    await save_turn(store, "s1", *later, ref="m2")
    assert await store.read_history("s1", "default") == later


async def test_of_two_identical_messages_the_deleted_one_goes(store: SessionStore) -> None:
    """The same text sent twice: deleting the first removes the first, so the second stays
    where it was, before its own answer."""
    same: Message = {"role": "user", "content": "[Ada] again"}
    first, second = {"role": "assistant", "content": "1"}, {"role": "assistant", "content": "2"}
    third = {"role": "assistant", "content": "3"}
    await save_turn(store, "s1", same, first, ref="m1")
    await save_turn(store, "s1", same, second, ref="m2")
    await save_turn(store, "s1", same, third, ref="m3")
    assert await store.forget_message("s1", "m2")
    assert await store.read_history("s1", "default") == [same, first, second, same, third]
    assert await store.forget_message("s1", "m1")
    assert await store.read_history("s1", "default") == [first, second, same, third]
    assert await store.forget_message("s1", "m3")
    assert await store.read_history("s1", "default") == [first, second, third]


REDIS_SCOPE_JUNK = {
    # kind: (what is written, whether a turn then reports the place as damaged)
    "state-type": True,
    "names-type": True,
    "queue-type": True,
    "tickets-type": True,
    "refindex-type": True,
    "generations": True,
    "current-name": True,
    "queue-entry": False,  # a junk waiter lapses like a dead one
    "claim-type": False,  # a junk claim is dropped: the message is answered
    "claim-value": False,
}
SQLITE_SCOPE_JUNK = {
    "current-name": True,
    "queue-entry": False,
    "claim-value": False,
    "lock-expiry": False,  # a lock whose expiry is not a number has lapsed
}


async def scope_junk(store: SessionStore, scope: str, kind: str) -> None:
    """Junk in the keys (or rows) the place itself owns, not in a session."""
    from bot.store.redis import RedisStore, scope_key

    if isinstance(store, RedisStore):
        redis = store._redis
        part = kind.removesuffix("-type")
        if kind.endswith("-type") and part != "claim":
            await redis.delete(scope_key(scope, part))
            await redis.set(scope_key(scope, part), "junk")
        elif kind == "generations":
            await redis.hset(scope_key(scope, "state"), "generations", "many")
        elif kind == "current-name":
            await redis.hset(scope_key(scope, "state"), "current", "no such: {name}")
        elif kind == "queue-entry":
            await redis.zadd(scope_key(scope, "queue"), {"0-junk": 0})
            await redis.hset(scope_key(scope, "tickets"), "0-junk", "soon")
        elif kind == "claim-type":
            await redis.delete(scope_key(scope, "claim:msg-1"))
            await redis.hset(scope_key(scope, "claim:msg-1"), "junk", "1")
        else:
            await redis.set(scope_key(scope, "claim:msg-1"), "junk")
        return
    db = store._db  # type: ignore[attr-defined]
    if kind == "current-name":
        db.execute("UPDATE scopes SET current = 'no such: {name}' WHERE scope = ?", (scope,))
    elif kind == "queue-entry":
        db.execute("INSERT INTO queue VALUES (?, '0-junk', 'soon')", (scope,))
    elif kind == "claim-value":
        db.execute("INSERT INTO claims VALUES (?, 'msg-1', 'junk', 'never')", (scope,))
    else:
        db.execute("UPDATE sessions SET lock_expires = 'never' WHERE scope = ?", (scope,))


@pytest.mark.parametrize("repair", ["clear", "new"])
@pytest.mark.parametrize(
    ("store", "kind"),
    [
        (backend, kind)
        for backend, junk in (("redis", REDIS_SCOPE_JUNK), ("sqlite", SQLITE_SCOPE_JUNK))
        for kind in [*junk, "all-at-once"]
    ],
    indirect=["store"],
)
async def test_junk_in_a_places_own_state_is_named_and_clear_or_new_repairs_it(
    store: SessionStore, kind: str, repair: str
) -> None:
    """Junk is either outlived (the message is answered) or named in one line; other places
    never notice; `/clear` or `/new` gets the place answering again, and `/new` loses no
    readable history."""
    from bot.commands import Commands
    from bot.errors import DamagedState

    junk = REDIS_SCOPE_JUNK if isinstance(store, RedisStore) else SQLITE_SCOPE_JUNK
    kinds = list(junk) if kind == "all-at-once" else [kind]
    kinds.sort(key=lambda each: each.endswith("-type"))  # a key's values before its type
    before: Message = {"role": "user", "content": "before"}
    await save_turn(store, "s1", before)
    await save_turn(store, "s2", before)
    for each in kinds:
        await scope_junk(store, "s1", each)
    if any(junk[each] for each in kinds):
        with pytest.raises(DamagedState, match=r"stored state is damaged \(.+\); /clear"):
            await store.begin_turn("s1", Ticket.now("msg-1"), BIG, 10_000)
    else:
        turn = await store.begin_turn("s1", Ticket.now("msg-1"), BIG, 10_000)
        assert await store.finish_turn(turn, [{"role": "user", "content": "answered"}], "msg-1")
    await save_turn(store, "s2", {"role": "user", "content": "other place"})
    if repair == "clear":
        await store.clear_session("s1")
    else:
        assert await Commands(store, ("openai/gpt-5.1",), "openai/gpt-5.1").new("s1", "fresh") == (
            "Started new session: fresh"
        )
    after: Message = {"role": "user", "content": "after"}
    await save_turn(store, "s1", after)
    current = await store.current_session("s1")
    assert await store.read_history("s1", current.name) == [after]
    if repair == "new" or current.name != "default":  # the old history was not cleared
        assert (await store.read_history("s1", "default"))[0] == before
    assert (await store.list_sessions("s1"))[0].name == current.name
    assert await store.read_history("s2", "default") == [
        before,
        {"role": "user", "content": "other place"},
    ]


@pytest.mark.parametrize(
    ("store", "what"),
    [
        ("redis", "current-name"),
        ("redis", "names-type"),
        ("redis", "meta-type"),
        ("sqlite", "current-name"),  # SQLite has no key types to get wrong
        ("sqlite", "meta-type"),
    ],
    indirect=["store"],
)
async def test_a_deletion_over_damaged_data_is_carried_out_or_named(
    store: SessionStore, what: str
) -> None:
    """A deleted message leaves the history, or the damage in the way is named and nothing
    changes: never a script error, never a silent skip."""
    from bot.errors import CorruptSession

    deleted: Message = {"role": "user", "content": "deleted later"}
    await save_turn(store, "s1", deleted, ref="m1")
    junk = REDIS_SCOPE_JUNK if isinstance(store, RedisStore) else SQLITE_SCOPE_JUNK
    if what in junk:
        await scope_junk(store, "s1", what)  # junk the deletion does not need
    else:
        await damage(store, "s1", what)
    try:
        removed = await store.forget_message("s1", "m1")
    except CorruptSession as error:
        assert error.name == "default"
        assert await store.read_history("s1", "default") == [deleted]
    else:
        assert removed and await store.read_history("s1", "default") == []


REDIS_DELETION_DAMAGE = {
    # kind: what the store names
    "state-type": "state is damaged (its state key has the wrong type)",
    "unindexed-names-type": "state is damaged (its names key has the wrong type)",
    "refindex-type": "state is damaged (its refindex key has the wrong type)",
    "generations": "state is damaged (a counter is not a number)",
    "meta-type": "Session 'default' cannot be read",
    "messages-type": "Session 'default' cannot be read",
    "refs-type": "Session 'default' cannot be read",
    "refseq-type": "Session 'default' cannot be read",
    "forgotten": "Session 'default' cannot be read",
    "bytes": "Session 'default' cannot be read",
    "unindexed-refs-type": "Session 'default' cannot be read",
}


@pytest.mark.parametrize("kind", sorted(REDIS_DELETION_DAMAGE))
async def test_a_deletion_redis_cannot_carry_out_is_named_and_changes_nothing(
    raw_redis_store: RedisStore, redis_url: str, kind: str
) -> None:
    """Keys of the wrong Redis type or counters that are not numbers, in the place or in the
    session holding the message: checked before anything is written."""
    import redis.asyncio as aioredis

    from bot.errors import BotError
    from bot.store.redis import scope_key

    store = raw_redis_store
    await save_turn(store, "s1", {"role": "user", "content": "deleted later"}, ref="m1")
    raw = aioredis.Redis.from_url(redis_url)  # bytes, so DUMP can be compared
    try:
        part = kind.removeprefix("unindexed-").removesuffix("-type")
        if kind in ("forgotten", "bytes"):
            await raw.hset(session_key("s1", "default", "meta"), kind, "many")
        elif kind.startswith("unindexed-"):  # stored before the index: it is built first
            await raw.delete(scope_key("s1", "refindex"))
            await raw.hdel(scope_key("s1", "state"), "refindex")
            junk = scope_key("s1", part) if part == "names" else session_key("s1", "default", part)
            await raw.delete(junk)
            await raw.set(junk, "junk")
        elif kind in ("state-type", "refindex-type", "generations"):
            await scope_junk(store, "s1", kind)
        else:
            await raw.delete(session_key("s1", "default", part))
            await raw.set(session_key("s1", "default", part), "junk")
        keys = sorted(await raw.keys(scope_key("s1", "*")))
        before = {k: await raw.dump(k) for k in keys}
        with pytest.raises(BotError) as refused:
            await store.forget_message("s1", "m1")
        assert REDIS_DELETION_DAMAGE[kind] in str(refused.value)
        assert sorted(await raw.keys(scope_key("s1", "*"))) == keys
        assert {k: await raw.dump(k) for k in keys} == before
    finally:
        await raw.aclose()


def exchange(i: int) -> list[Message]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


async def test_a_summary_is_kept_beside_the_messages_it_covers(store: SessionStore) -> None:
    for i in range(4):
        await save_turn(store, "s1", *exchange(i))
    assert await store.read_summary("s1", "default") is None
    source = await store.begin_summary("s1", "default", "tok", 60_000, keep=2, limit=100)
    assert source is not None and source.summary is None
    assert [m["content"] for m in source.messages] == ["q0", "a0", "q1", "a1", "q2", "a2"]
    assert source.next_role == "user"  # the first message left out
    upto = source.positions[3]
    assert await store.save_summary("s1", "tok", source, Summary("about q0 q1", 4, upto))
    assert await store.read_summary("s1", "default") == Summary("about q0 q1", 4, upto)
    assert len(await store.read_history("s1", "default")) == 8  # nothing is removed
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.summary == Summary("about q0 q1", 4, upto) and turn.pending == 4
    assert [m["content"] for m in turn.recent[-4:]] == ["q2", "a2", "q3", "a3"]
    assert await store.finish_turn(turn, exchange(4))
    # The next fold starts where the summary stops, and may reach the newest message.
    source = await store.begin_summary("s1", "default", "tok", 60_000, keep=0, limit=3)
    assert source is not None and source.summary == Summary("about q0 q1", 4, upto)
    assert [m["content"] for m in source.messages] == ["q2", "a2", "q3"]
    assert source.next_role == "assistant"
    await store.release_summary("s1", "default", "tok")
    source = await store.begin_summary("s1", "default", "tok", 60_000, keep=0, limit=100)
    assert source is not None and source.next_role is None and len(source.messages) == 6
    await store.release_summary("s1", "default", "tok")
    assert await store.begin_summary("s1", "default", "tok", 60_000, keep=6, limit=9) is None


async def test_only_one_token_summarizes_a_session_at_a_time(store: SessionStore) -> None:
    for i in range(3):
        await save_turn(store, "s1", *exchange(i))
    first = await store.begin_summary("s1", "default", "one", 60_000, keep=0, limit=100)
    assert first is not None
    with pytest.raises(SummaryInProgress):
        await store.begin_summary("s1", "default", "two", 60_000, keep=0, limit=100)
    assert await store.save_summary("s1", "one", first, Summary("s", 2, first.positions[1]))
    second = await store.begin_summary("s1", "default", "two", 60_000, keep=0, limit=100)
    assert second is not None and second.messages[0]["content"] == "q1"
    await store.release_summary("s1", "default", "two")
    # A summary written from an older one is refused: that stretch was folded already.
    assert not await store.save_summary("s1", "one", first, Summary("again", 2, 9))
    assert await store.read_summary("s1", "default") == Summary("s", 2, first.positions[1])
    lapsed = await store.begin_summary("s1", "default", "three", 1, keep=0, limit=100)
    assert lapsed is not None
    await asyncio.sleep(0.05)  # its lease (1 ms) lapses: another may take the session
    assert await store.begin_summary("s1", "default", "four", 60_000, keep=0, limit=100)


async def test_clear_and_import_drop_the_summary(store: SessionStore) -> None:
    await save_turn(store, "s1", *exchange(0), *exchange(1))
    source = await store.begin_summary("s1", "default", "tok", 60_000, keep=0, limit=100)
    assert source is not None
    before_clear = await store.begin_summary("s1", "default", "tok", 60_000, keep=2, limit=100)
    assert before_clear is not None
    await store.clear_session("s1")
    assert not await store.save_summary("s1", "tok", before_clear, Summary("old", 2, 1))
    assert await store.read_summary("s1", "default") is None
    await save_turn(store, "s1", *exchange(2))
    source = await store.begin_summary("s1", "default", "tok", 60_000, keep=0, limit=100)
    assert source is not None
    assert await store.save_summary("s1", "tok", source, Summary("s", 2, source.positions[-1]))
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.pending == 0
    await store.finish_turn(turn, [])
    await store.clear_session("s1")
    assert await store.read_summary("s1", "default") is None
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.summary is None and turn.pending is None
    await store.finish_turn(turn, exchange(3))
    source = await store.begin_summary("s1", "default", "tok", 60_000, keep=0, limit=100)
    assert source is not None
    assert await store.save_summary("s1", "tok", source, Summary("s", 2, source.positions[-1]))
    await store.import_sessions("s1", {"default": exchange(9)}, SessionSettings("m"))
    assert await store.read_summary("s1", "default") is None


# /retry and /undo: the last exchange, its record, and rewriting it under the turn's lock.

FIRST: list[Message] = [
    {"role": "user", "content": "[Bob (user id 7)]: first question"},
    {"role": "assistant", "content": "first answer"},
]


async def two_exchanges(store: SessionStore, scope: str = "s1") -> None:
    """FIRST (ref m1, answered in message 100), then TOOL_ROUND (ref m2, answered in messages
    200 and 201)."""
    await save_turn(store, scope, *FIRST, ref="m1")
    await store.note_answer(scope, "m1", ["100"])
    await save_turn(store, scope, *TOOL_ROUND, ref="m2")
    await store.note_answer(scope, "m2", ["200", "201"])


async def test_the_last_exchange_is_the_newest_question_and_all_that_answered_it(
    store: SessionStore,
) -> None:
    await two_exchanges(store)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None
    assert list(exchange.messages) == TOOL_ROUND and exchange.answered
    assert exchange.stored == tuple(encode_message(m) for m in TOOL_ROUND)
    assert (exchange.ref, exchange.replies) == ("m2", ("200", "201"))
    await store.finish_turn(turn, [])


async def test_an_answer_noted_again_replaces_the_record_and_an_unknown_ref_is_ignored(
    store: SessionStore,
) -> None:
    await two_exchanges(store)
    await store.note_answer("s1", "m2", ["300"])
    await store.note_answer("s1", "never-stored", ["400"])
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None and exchange.replies == ("300",)
    await store.finish_turn(turn, [])
    assert await store.read_history("s1", "default") == [*FIRST, *TOOL_ROUND]


@pytest.mark.parametrize(
    "history",
    [[], [{"role": "assistant", "content": "an answer without its question"}]],
    ids=["empty", "no-question"],
)
async def test_a_session_without_a_question_has_no_last_exchange(
    store: SessionStore, history: list[Message]
) -> None:
    if history:
        await save_turn(store, "s1", *history)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert await store.last_exchange(turn) is None
    await store.finish_turn(turn, [])


async def test_a_question_without_its_answer_is_an_exchange_not_answered(
    store: SessionStore,
) -> None:
    await save_turn(store, "s1", *FIRST, {"role": "user", "content": "imported, unanswered"})
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None and not exchange.answered
    assert exchange.ref is None and exchange.replies == ()  # stored without a ref
    await store.finish_turn(turn, [])


async def test_a_retried_answer_replaces_the_old_one_and_the_question_stays(
    store: SessionStore,
) -> None:
    await two_exchanges(store)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None
    new = [{"role": "assistant", "content": "a better answer"}]
    assert await store.rewrite_last_exchange(turn, exchange, new)
    assert await store.read_history("s1", "default") == [*FIRST, TOOL_ROUND[0], *new]
    again = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)  # the lock was released
    assert again.recent == [*FIRST, TOOL_ROUND[0], *new]
    retried = await store.last_exchange(again)
    assert retried is not None and (retried.ref, retried.replies) == ("m2", ("200", "201"))
    await store.finish_turn(again, [])
    assert await store.forget_message("s1", "m2")  # the question keeps its ref
    assert await store.read_history("s1", "default") == [*FIRST, *new]


async def test_an_undone_exchange_is_gone_with_its_ref_and_the_one_before_is_last(
    store: SessionStore,
) -> None:
    await two_exchanges(store)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None
    assert await store.rewrite_last_exchange(turn, exchange, None)
    assert await store.read_history("s1", "default") == FIRST
    assert (await store.current_session("s1")).message_count == 2
    assert not await store.forget_message("s1", "m2")  # its ref went with it
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    assert turn.recent == FIRST
    previous = await store.last_exchange(turn)
    assert previous is not None and (previous.ref, previous.replies) == ("m1", ("100",))
    assert await store.rewrite_last_exchange(turn, previous, None)
    assert await store.read_history("s1", "default") == []
    await save_turn(store, "s1", *FIRST, ref="m3")  # the session goes on normally
    assert await store.read_history("s1", "default") == FIRST


@pytest.mark.parametrize("answer", [None, [{"role": "assistant", "content": "again"}]])
async def test_a_rewrite_repeated_after_a_lost_reply_changes_nothing_more(
    store: SessionStore, answer: list[Message] | None
) -> None:
    await two_exchanges(store)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None
    assert await store.rewrite_last_exchange(turn, exchange, answer)
    after = await store.read_history("s1", "default")
    assert await store.rewrite_last_exchange(turn, exchange, answer)
    assert await store.read_history("s1", "default") == after


async def test_a_rewrite_after_the_question_was_deleted_changes_nothing(
    store: SessionStore,
) -> None:
    """The asker deletes the question in Discord while its answer is being written again:
    the exchange is no longer the session's last, so nothing is rewritten, and the lock is
    free at once."""
    await two_exchanges(store)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None
    assert await store.forget_message("s1", "m2")
    assert not await store.rewrite_last_exchange(turn, exchange, None)
    assert await store.read_history("s1", "default") == [*FIRST, *TOOL_ROUND[1:]]
    later = await store.begin_turn("s1", Ticket.now(), BIG, 100)  # not busy
    await store.finish_turn(later, [])


async def test_a_rewrite_during_a_clear_is_not_kept(store: SessionStore) -> None:
    from bot.store.base import SessionCleared

    await two_exchanges(store)
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None
    await store.clear_session("s1")
    with pytest.raises(SessionCleared):
        await store.rewrite_last_exchange(turn, exchange, None)
    assert await store.read_history("s1", "default") == []
    await save_turn(store, "s1", *FIRST)  # the lock is free


async def test_a_rewrite_whose_lock_was_taken_changes_nothing(store: SessionStore) -> None:
    await two_exchanges(store)
    stale = await lapsed_turn(store, "s1")
    exchange = await store.last_exchange(stale)
    assert exchange is not None
    await save_turn(store, "s1", {"role": "user", "content": "newer"})
    assert not await store.rewrite_last_exchange(stale, exchange, None)
    assert await store.read_history("s1", "default") == [
        *FIRST,
        *TOOL_ROUND,
        {"role": "user", "content": "newer"},
    ]


@pytest.mark.parametrize("rewrite", ["undo", "retry"])
async def test_a_lapsed_turn_saves_nothing_after_an_undo_or_retry(
    store: SessionStore, rewrite: str
) -> None:
    """A turn frozen past its lease began with the undone (or retried) exchange in its
    history: saving it afterwards would answer a conversation that no longer exists."""
    await two_exchanges(store)
    stale = await lapsed_turn(store, "s1")
    turn = await store.begin_turn("s1", Ticket.now(), BIG, 10_000)
    exchange = await store.last_exchange(turn)
    assert exchange is not None
    answer = None if rewrite == "undo" else [{"role": "assistant", "content": "again"}]
    assert await store.rewrite_last_exchange(turn, exchange, answer)
    after = await store.read_history("s1", "default")
    assert not await store.finish_turn(stale, QUESTION, "m9")
    assert await store.read_history("s1", "default") == after


async def test_a_lapsed_undo_saves_when_the_session_did_not_change(store: SessionStore) -> None:
    await two_exchanges(store)
    stale = await lapsed_turn(store, "s1")
    exchange = await store.last_exchange(stale)
    assert exchange is not None
    assert await store.rewrite_last_exchange(stale, exchange, None)
    assert await store.read_history("s1", "default") == FIRST


@pytest.mark.parametrize("policy", [StorePolicy("openai/gpt-5.1", history_cap=2)])
async def test_answer_records_on_redis_are_no_more_than_the_refs_kept(
    raw_redis_store: RedisStore,
) -> None:
    """Redis keeps records beside the refs: trimming, forgetting and clearing drop them."""
    store = raw_redis_store
    answers = session_key("s1", "default", "answers")
    for i in range(1, 4):
        await save_turn(store, "s1", {"role": "user", "content": f"q{i}"}, ref=f"m{i}")
        await store.note_answer("s1", f"m{i}", [str(i)])
    assert sorted(await store._redis.hkeys(answers)) == ["m2", "m3"]  # m1 was trimmed
    assert await store.forget_message("s1", "m2")
    assert await store._redis.hkeys(answers) == ["m3"]
    await store.clear_session("s1")
    assert not await store._redis.exists(answers)


@pytest.mark.parametrize("junked", ["lock", "meta", "claim", "state"])
async def test_junk_a_save_meets_on_redis_is_reported_or_passed_over(
    raw_redis_store: RedisStore, junked: str
) -> None:
    """A key of the wrong type written while a turn ran: where the session's lock or meta
    is, the save stops before it writes to the session (the session is reported unreadable);
    a junk claim or place state only goes unrecorded. Either way the answer is not given
    again: the claim, when it could be read, is settled as answered."""
    from bot.errors import CorruptSession
    from bot.store.redis import scope_key

    store = raw_redis_store
    redis = store._redis
    turn = await store.begin_turn("s1", Ticket.now(claim="1001"), BIG, 10_000)
    key = {
        "lock": session_key("s1", "default", "lock"),
        "meta": session_key("s1", "default", "meta"),
        "claim": scope_key("s1", "claim:1001"),
        "state": scope_key("s1", "state"),
    }[junked]
    await redis.delete(key)
    await redis.rpush(key, "junk")
    answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    if junked in ("lock", "meta"):
        with pytest.raises(CorruptSession):
            await store.finish_turn(turn, answer, "1001")
        assert await redis.llen(session_key("s1", "default", "messages")) == 0
    else:
        assert await store.finish_turn(turn, answer, "1001")
        assert await redis.llen(session_key("s1", "default", "messages")) == 2
    if junked != "claim":
        with pytest.raises(AlreadyClaimed) as claimed:
            await store.begin_turn("s1", Ticket.now(claim="1001"), BIG, 10_000)
        assert claimed.value.answered
