"""On Redis 7 the store's scripts are one function library, loaded once and called with
FCALL (`bot.store.redis_functions`): turns work on a new server, after the functions are
flushed, beside another version's library (which a process's first load deletes, leaving
other applications' alone), and, where Redis refuses functions, with EVALSHA as before."""

from __future__ import annotations

from pathlib import Path

from bot.store.base import SessionSettings, StorePolicy, Ticket
from bot.store.redis import RedisStore
from bot.store.redis_functions import LIBRARY_PREFIX
from tests.conftest import TEST_MODELS, RedisServer

POLICY = StorePolicy(default_model=TEST_MODELS[0], ttl_seconds=0)
LOCK_MS = 30_000
SCOPE = "discord:1"


async def take_turns(store: RedisStore, count: int) -> list[str]:
    """`count` turns in one place, each saving a message: what the session then holds."""
    for i in range(count):
        turn = await store.begin_turn(SCOPE, Ticket.now(), 100_000, LOCK_MS)
        await store.finish_turn(turn, [{"role": "user", "content": f"message {i}"}])
    history = await store.read_history(SCOPE, "default")
    return [str(m["content"]) for m in history]


def libraries(server: RedisServer) -> list[str]:
    with server.admin() as client:
        listed = client.function_list()
    return sorted(dict(zip(e[::2], e[1::2], strict=True))[b"library_name"].decode() for e in listed)


def calls(server: RedisServer, command: str) -> int:
    with server.admin() as client:
        stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_the_scripts_are_one_library_loaded_once(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        assert await take_turns(store, 3) == ["message 0", "message 1", "message 2"]
        await store.create_session(SCOPE, "other", SessionSettings(TEST_MODELS[1]))
        assert (await store.current_session(SCOPE)).name == "other"
    finally:
        await store.close()
    [library] = libraries(own_redis)
    assert library.startswith(LIBRARY_PREFIX)
    assert calls(own_redis, "function|load") == 1
    assert calls(own_redis, "fcall") >= 7
    assert calls(own_redis, "evalsha") == calls(own_redis, "script|load") == 0


async def test_flushed_functions_are_loaded_again(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        await take_turns(store, 1)
        with own_redis.admin() as client:
            client.execute_command("FUNCTION", "FLUSH")
        assert await take_turns(store, 1) == ["message 0", "message 0"]
        assert len(libraries(own_redis)) == 1
    finally:
        await store.close()


async def test_another_versions_library_is_deleted_and_others_are_kept(
    own_redis: RedisServer,
) -> None:
    old = f"{LIBRARY_PREFIX}0123456789"
    with own_redis.admin() as client:
        for name in (old, "someone_else"):
            client.execute_command(
                "FUNCTION",
                "LOAD",
                f"#!lua name={name}\nredis.register_function('{name}_f', function() return 1 end)",
            )
    store = RedisStore.from_url(own_redis.url, POLICY)
    try:
        await take_turns(store, 1)
    finally:
        await store.close()
    kept = libraries(own_redis)
    assert old not in kept and "someone_else" in kept
    assert len([name for name in kept if name.startswith(LIBRARY_PREFIX)]) == 1


async def test_where_functions_are_refused_the_scripts_run_as_before(
    own_redis: RedisServer,
) -> None:
    with own_redis.admin() as client:
        client.execute_command(
            "ACL", "SETUSER", "bot", "on", ">secret", "~*", "&*", "+@all", "-function", "-fcall"
        )
    url = own_redis.url.replace("redis://", "redis://bot:secret@")
    store = RedisStore.from_url(url, POLICY)
    try:
        assert await take_turns(store, 2) == ["message 0", "message 1"]
    finally:
        await store.close()
    assert libraries(own_redis) == []
    assert calls(own_redis, "evalsha") >= 4


async def test_a_redis_without_functions_runs_the_scripts_as_before(tmp_path: Path) -> None:
    """As Redis 6 answers: FCALL and FUNCTION are unknown commands."""
    server = RedisServer(
        tmp_path, options=["--rename-command", "FCALL", "", "--rename-command", "FUNCTION", ""]
    )
    server.start()
    try:
        store = RedisStore.from_url(server.url, POLICY)
        try:
            assert await take_turns(store, 2) == ["message 0", "message 1"]
            turn = await store.begin_turn("discord:2", Ticket.now(), 100_000, LOCK_MS)  # first:
            await store.finish_turn(turn, [])  # the script and a read in one transaction
        finally:
            await store.close()
        assert calls(server, "evalsha") >= 6
    finally:
        server.stop()
