"""Deleting a session, or everything of a place, leaves nothing of it in storage (part of the
store contract: each test runs on both backends, and reads what the backend really holds,
every Redis key of the place, every SQLite row and the file's own bytes). A turn that was
running in a deleted session saves nothing, rather than bringing it back."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing, suppress
from pathlib import Path

import pytest

from bot.errors import UnknownSession
from bot.store.base import SessionCleared, SessionSettings, SessionStore, Ticket, Turn
from bot.store.redis import RedisStore, places_key, scope_key
from bot.store.sqlite import SqliteStore
from tests.conftest import TEST_MODELS

BIG = 1_000_000
SETTINGS = SessionSettings(TEST_MODELS[1], ("acme/search",))
SECRET = "the-secret-said-in-work"
KEPT = "what-another-session-keeps"
QUESTION = [
    {"role": "user", "content": f"[Ann (user id 7)] {SECRET} again"},
    {"role": "assistant", "content": "noted"},
]


async def say(store: SessionStore, scope: str, text: str, ref: str) -> None:
    turn = await store.begin_turn(scope, Ticket.now(claim=ref), BIG, 10_000)
    added = [{"role": "user", "content": f"[Ann (user id 7)] {text}"}]
    assert await store.finish_turn(turn, [*added, {"role": "assistant", "content": "ok"}], ref)


async def everything_stored(store: SessionStore, scope: str) -> str:
    """All the backend holds for `scope` (Redis, plain or cluster: every key of the place
    and its value, read with the store's own client; SQLite: every row naming the place, and
    the file's bytes once its journal is written back), as one text to search."""
    if isinstance(store, RedisStore):
        client = store._redis
        found = []
        pattern = scope_key(scope, "*").replace("{", "[{]")
        async for key in client.scan_iter(match=pattern, count=1000):
            kind = str(await client.type(key))
            value: object
            if kind == "string":
                value = await client.get(key)
            elif kind == "hash":
                value = await client.hgetall(key)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            else:
                value = await client.smembers(key)
            found.append(f"{key} = {value!r}")
        found.sort()
        found.append(repr(await client.zrange(places_key(), 0, -1)))
        return "\n".join(found)
    assert isinstance(store, SqliteStore)
    return sqlite_stored(store, scope)


def sqlite_stored(store: SqliteStore, scope: str) -> str:
    path = store_path(store)
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = [
            f"{table}: {row!r}"
            for table in tables
            if table != "sqlite_sequence"
            for row in db.execute(f"SELECT * FROM {table}")
            if scope in row
        ]
    raw = path.read_bytes() + (
        Path(f"{path}-wal").read_bytes() if Path(f"{path}-wal").exists() else b""
    )
    return "\n".join(rows) + "\n-- the file --\n" + raw.decode("utf-8", "replace")


def store_path(store: SqliteStore) -> Path:
    (path,) = [row[2] for row in store._db.execute("PRAGMA database_list") if row[1] == "main"]
    return Path(path)


async def test_deleting_a_session_leaves_nothing_of_it(store: SessionStore) -> None:
    await store.create_session("p", "work", SETTINGS)
    await say(store, "p", SECRET, "m1")
    await store.create_session("p", "keep", SETTINGS)
    await say(store, "p", KEPT, "m2")
    assert SECRET in await everything_stored(store, "p")

    assert await store.delete_session("p", "work") is None  # not the current one

    assert [s.name for s in await store.list_sessions("p")] == ["keep"]
    assert await store.read_history("p", "work") == []
    with pytest.raises(UnknownSession):
        await store.switch_session("p", "work")
    assert not await store.forget_message("p", "m1")  # no reference to it is left
    stored = await everything_stored(store, "p")
    assert SECRET not in stored and "s:work:" not in stored
    assert KEPT in stored  # the place's other session is untouched
    assert await store.forget_message("p", "m2")


@pytest.mark.parametrize(
    ("sessions", "fresh"), [(["default"], "default"), (["default", "work"], "chat-1")]
)
async def test_deleting_the_current_session_leaves_a_fresh_empty_one(
    store: SessionStore, sessions: list[str], fresh: str
) -> None:
    await say(store, "p", KEPT, "m0")
    if len(sessions) > 1:
        await store.create_session("p", "work", SETTINGS)
    await say(store, "p", SECRET, "m1")
    deleted = sessions[-1]

    assert await store.delete_session("p", deleted) == fresh

    current = await store.current_session("p")
    assert (current.name, current.message_count) == (fresh, 0)
    assert current.settings == SessionSettings(TEST_MODELS[0])  # the defaults, not the deleted
    assert SECRET not in await everything_stored(store, "p")
    await say(store, "p", "in the fresh one", "m2")
    assert len(await store.read_history("p", fresh)) == 2


async def test_deleting_an_unknown_session_changes_nothing(store: SessionStore) -> None:
    await say(store, "p", KEPT, "m1")
    before = await everything_stored(store, "p")
    with pytest.raises(UnknownSession, match="There is no session named 'ghost'"):
        await store.delete_session("p", "ghost")
    assert await everything_stored(store, "p") == before


async def lapsed_turn(store: SessionStore, scope: str) -> Turn:
    turn = await store.begin_turn(scope, Ticket.now(), BIG, 1)
    await asyncio.sleep(0.05)  # at least 50 times the lease: it has lapsed
    return turn


@pytest.mark.parametrize("turn_kind", ["live", "lapsed"])
@pytest.mark.parametrize("deleted", ["current", "no-longer-current", "the-whole-place"])
async def test_a_turn_running_in_a_deleted_session_saves_nothing(
    store: SessionStore, turn_kind: str, deleted: str
) -> None:
    """Nothing of a deleted session comes back, whether its turn still holds the lock or its
    process froze past the lease, and even when a fresh session of the same name exists."""
    await store.create_session("p", "work", SETTINGS)
    await say(store, "p", "before", "m0")
    if turn_kind == "live":
        turn = await store.begin_turn("p", Ticket.now(), BIG, 10_000)
    else:
        turn = await lapsed_turn(store, "p")
    if deleted == "current":
        assert await store.delete_session("p", "work") == "default"
    elif deleted == "no-longer-current":
        await store.create_session("p", "next", SETTINGS)
        assert await store.delete_session("p", "work") is None
    else:
        assert await store.forget_place("p") == 1
    if turn_kind == "live":  # its answer is shown, with a note that it was not kept
        with pytest.raises(SessionCleared):
            await store.finish_turn(turn, QUESTION, "m1")
    else:  # its lock lapsed: "send it again", or the same note
        with suppress(SessionCleared):
            assert not await store.finish_turn(turn, QUESTION, "m1")
    assert "work" not in [s.name for s in await store.list_sessions("p")]
    assert SECRET not in await everything_stored(store, "p")
    await say(store, "p", "after", "m2")  # nothing is left locked


async def test_forgetting_a_place_leaves_nothing_of_it(store: SessionStore) -> None:
    await say(store, "p", SECRET, "m1")
    await store.create_session("p", "work", SETTINGS)
    await say(store, "p", SECRET, "m2")
    await store.set_scope_option("p", "reply_mode", "all")
    await store.note_place("p")
    await say(store, "other", KEPT, "m3")
    await store.set_scope_option("other", "reply_mode", "threads")
    await store.note_place("other")

    assert await store.forget_place("p") == 2

    assert await store.list_sessions("p") == []
    current = await store.current_session("p")
    assert (current.name, current.message_count) == ("default", 0)
    assert await store.scope_option("p", "reply_mode") is None
    assert [place.scope for place in await store.recent_places()] == ["other"]
    assert not await store.forget_message("p", "m1")
    stored = await everything_stored(store, "p")
    assert SECRET not in stored
    assert "reply_mode" not in stored.split("\n-- the file --\n")[0]
    assert await store.scope_option("other", "reply_mode") == "threads"  # others untouched
    assert KEPT in await everything_stored(store, "other")
    assert await store.forget_place("p") == 0  # again: nothing left to delete
