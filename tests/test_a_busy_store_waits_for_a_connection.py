"""A busy bot (hundreds of channels talking at once) keeps to its Redis connection limit: a
call past it waits for a free connection instead of failing, and calls cut off by their
deadline while Redis was frozen give their connections back, so the store works again as
soon as Redis does."""

from __future__ import annotations

import asyncio
import signal

from bot.errors import StoreUnavailable
from bot.store.base import DEFAULT_SESSION, StorePolicy
from bot.store.redis import MAX_CONNECTIONS, RedisStore
from tests.conftest import TEST_MODELS, RedisServer

POLICY = StorePolicy(default_model=TEST_MODELS[0], ttl_seconds=0)
CALLS = 3 * MAX_CONNECTIONS


async def test_calls_past_the_connection_limit_wait_and_all_succeed(
    own_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        infos = await asyncio.gather(*(store.current_session(f"discord:{i}") for i in range(CALLS)))
        assert [info.name for info in infos] == [DEFAULT_SESSION] * CALLS
        assert 1 <= own_redis.clients() <= MAX_CONNECTIONS
    finally:
        await store.close()


async def test_calls_cut_off_while_redis_is_frozen_give_their_connections_back(
    own_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY, call_timeout=2.0)
    try:
        await store.ping()
        assert own_redis.process is not None
        own_redis.process.send_signal(signal.SIGSTOP)
        frozen = await asyncio.gather(
            *(store.current_session(f"discord:{i}") for i in range(CALLS)),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, StoreUnavailable) for outcome in frozen)

        own_redis.process.send_signal(signal.SIGCONT)
        infos = await asyncio.gather(*(store.current_session(f"discord:{i}") for i in range(CALLS)))
        assert [info.name for info in infos] == [DEFAULT_SESSION] * CALLS
        assert own_redis.clients() <= MAX_CONNECTIONS
    finally:
        await store.close()
