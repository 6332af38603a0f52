"""On a single Redis the store's scripts share one connection, their commands written
together (`bot.store.redis_pipelining`): many channels at once need no more connections,
each call gets its own reply even when an earlier one gave up, a connection that went
silent is replaced after a deadline, and a restarted Redis is used again at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.errors import StoreUnavailable
from bot.store.base import SessionSettings, StorePolicy, Ticket
from bot.store.redis import RedisStore
from tests.conftest import TEST_MODELS, RedisServer, free_port

POLICY = StorePolicy(default_model=TEST_MODELS[0], ttl_seconds=0)
SETTINGS = SessionSettings(TEST_MODELS[0])
CHANNELS = 300
LOCK_MS = 30_000


async def test_many_channels_at_once_share_one_connection_each_with_its_own_answer(
    own_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        scopes = [f"discord:{i}" for i in range(CHANNELS)]
        await asyncio.gather(
            *(store.create_session(s, f"s{i}", SETTINGS) for i, s in enumerate(scopes))
        )
        current = await asyncio.gather(*(store.current_session(s) for s in scopes))
        assert [info.name for info in current] == [f"s{i}" for i in range(CHANNELS)]
        assert own_redis.clients() == 1
    finally:
        await store.close()


async def test_a_reply_to_a_call_that_gave_up_never_reaches_a_later_call(
    own_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        await store.create_session("discord:1", "alpha", SETTINGS)
        await store.create_session("discord:2", "beta", SETTINGS)
        with own_redis.admin() as client:
            client.execute_command("CLIENT", "PAUSE", 500, "ALL")  # both wait behind it
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.current_session("discord:1"), 0.1)
        assert (await store.current_session("discord:2")).name == "beta"
        assert (await store.current_session("discord:1")).name == "alpha"
    finally:
        await store.close()


class MutingProxy:
    """A TCP proxy to Redis that can go silent for the connections open so far (as a
    dropped network path does: no error, no reply), while new ones pass."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.muted: set[asyncio.StreamWriter] = set()
        self.open: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def mute(self) -> None:
        self.muted |= self.open

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.open.add(writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if writer not in self.muted:
                        sink.write(data)
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        for writer in self.open:
            writer.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy(own_redis: RedisServer) -> AsyncIterator[MutingProxy]:
    proxy = MutingProxy(own_redis.port)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_a_connection_gone_silent_is_replaced_after_a_call_runs_out_of_time(
    proxy: MutingProxy,
) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0", POLICY, call_timeout=1.0)
    try:
        await store.create_session("discord:1", "alpha", SETTINGS)
        proxy.mute()
        with pytest.raises(StoreUnavailable):
            await store.current_session("discord:1")
        assert (await store.current_session("discord:1")).name == "alpha"
    finally:
        await store.close()


async def test_a_turn_on_a_silent_connection_gives_up_at_its_deadline(
    proxy: MutingProxy,
) -> None:
    """A turn's calls have no timer of their own: the shared connection keeps their
    deadline (one timer for every call on it). Without it this turn would wait forever."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0", POLICY, call_timeout=1.0)
    try:
        turn = await store.begin_turn("discord:1", Ticket.now(), 100_000, LOCK_MS)
        await store.finish_turn(turn, [{"role": "user", "content": "before"}])
        proxy.mute()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(
                store.begin_turn("discord:1", Ticket.now(), 100_000, LOCK_MS), 30
            )
        turn = await store.begin_turn("discord:1", Ticket.now(), 100_000, LOCK_MS)
        assert [m["content"] for m in turn.recent] == ["before"]
        assert await store.finish_turn(turn, [{"role": "user", "content": "after"}])
        assert proxy.connections == 2
    finally:
        await store.close()


async def test_the_first_calls_after_redis_restarts_succeed(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        await store.ping()  # a connection of redis-py's pool
        await store.create_session("discord:1", "alpha", SETTINGS)  # the shared one
        own_redis.stop()
        await asyncio.sleep(0.2)  # down for a moment, the bot running
        own_redis.start()  # empty, its scripts forgotten
        await store.ping()
        assert (await store.current_session("discord:1")).name == "default"
    finally:
        await store.close()


async def test_a_password_and_a_database_number_are_used(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    store = RedisStore.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3", POLICY)
    try:
        await store.create_session("discord:1", "alpha", SETTINGS)
        with server.admin(db=3) as in_three, server.admin(db=0) as in_zero:
            assert in_three.dbsize() > 0
            assert in_zero.dbsize() == 0
        assert (await store.current_session("discord:1")).name == "alpha"
    finally:
        await store.close()
        server.stop()
