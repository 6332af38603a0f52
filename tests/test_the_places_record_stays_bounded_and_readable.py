"""The record of places answered lately (read at start-up to catch up on what was missed)
keeps a week (`PLACES_KEPT_SECONDS`) and at most `PLACES_KEPT` places, though noting a place
checks the count only when the place is new and the age only of the oldest; junk in either
of its keys is dropped."""

from __future__ import annotations

import time

import pytest

from bot.store.base import PLACES_KEPT, PLACES_KEPT_SECONDS, NotedPlace, StorePolicy, Ticket
from bot.store.redis import RedisStore, place_servers_key, places_key
from tests.conftest import TEST_MODELS, RedisServer

POLICY = StorePolicy(default_model=TEST_MODELS[0], ttl_seconds=0)


async def test_places_past_their_age_leave_the_record_at_the_next_note(
    own_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        await store.note_place("old", "guild:1")
        await store.note_place("new", "guild:2")
        with own_redis.admin() as client:  # "old" was noted before the age kept
            client.zadd(places_key(), {"old": time.time() - PLACES_KEPT_SECONDS - 60})
        other = RedisStore.from_url(own_redis.url, POLICY)  # another process
        try:
            await other.note_place("new")  # a place known already
        finally:
            await other.close()
        assert await store.recent_places() == [NotedPlace("new", "guild:2")]
        with own_redis.admin() as client:
            assert client.zrange(places_key(), 0, -1) == [b"new"]
            assert client.hgetall(place_servers_key()) == {b"new": b"guild:2"}
    finally:
        await store.close()


async def test_a_new_place_past_the_count_pushes_out_the_oldest(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        now = time.time()
        with own_redis.admin() as client:  # a full record, oldest first
            client.zadd(places_key(), {f"p{i}": now - 1000 + i for i in range(PLACES_KEPT)})
            client.hset(place_servers_key(), mapping={"p0": "guild:0", "p1": "guild:1"})
        await store.note_place("p1")  # known: nothing leaves
        await store.note_place("newcomer", "guild:9")
        places = await store.recent_places()
        assert len(places) == PLACES_KEPT
        assert places[0] == NotedPlace("newcomer", "guild:9")
        assert NotedPlace("p1", "guild:1") in places
        assert "p0" not in {place.scope for place in places}
        with own_redis.admin() as client:
            assert client.hget(place_servers_key(), "p0") is None
    finally:
        await store.close()


@pytest.mark.parametrize("damaged", ["places", "servers"])
async def test_junk_in_the_record_is_dropped_and_noting_goes_on(
    own_redis: RedisServer, damaged: str
) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        await store.note_place("a", "guild:1")
        with own_redis.admin() as client:
            key = places_key() if damaged == "places" else place_servers_key()
            client.delete(key)
            client.set(key, "junk")
        if damaged == "servers":  # read first: the servers are unknown, the places kept
            assert await store.recent_places() == [NotedPlace("a", None)]
        turn = await store.begin_turn("b", Ticket.now(server="guild:2"), 10_000, 30_000)
        await store.finish_turn(turn, [])
        await store.note_place("c", "guild:3")
        places = await store.recent_places()
        assert places[:2] == [NotedPlace("c", "guild:3"), NotedPlace("b", "guild:2")]
    finally:
        await store.close()
