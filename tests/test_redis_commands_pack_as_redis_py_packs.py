"""The Redis store packs commands with hiredis (`_HiredisPackedConnection`): the bytes on the
wire, and the refusal of what Redis has no form for, are redis-py's own."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError
from redis.typing import EncodableT

from bot.store.redis import _HiredisPackedConnection

COMMANDS: list[tuple[EncodableT, ...]] = [
    ("EVALSHA", "a" * 40, 2, "k:{s}:state", "k:{s}:names", 12_000, 1796204047.14969, "é" * 300),
    ("SET", "k", "x" * 70_000),  # past redis-py's own buffer cutoff
    ("CONFIG GET", "maxmemory"),  # a command name of two words
    (b"CLIENT SETNAME", "bot"),
    ("SET", bytearray(b"ab"), memoryview(b"cd")),
    ("SET", "k", -1),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_commands_pack_to_the_bytes_redis_py_sends(command: tuple[EncodableT, ...]) -> None:
    ours, theirs = _HiredisPackedConnection(), aioredis.Connection()
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))


@pytest.mark.parametrize("value", [True, None, object()])
def test_what_redis_has_no_form_for_is_refused_as_redis_py_refuses_it(value: object) -> None:
    with pytest.raises(DataError):
        _HiredisPackedConnection().pack_command("SET", "k", value)  # type: ignore[arg-type]


async def test_the_store_talks_to_redis_through_it(redis_url: str) -> None:
    from bot.store.base import StorePolicy
    from bot.store.redis import RedisStore

    store = RedisStore.from_url(redis_url, StorePolicy(default_model="openai/gpt-5.1"))
    try:
        await store.ping()
        pool = store._redis.connection_pool  # type: ignore[union-attr]
        assert pool.connection_class is _HiredisPackedConnection
    finally:
        await store.close()
