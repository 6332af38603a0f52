"""Many channels talking at once in one process: every channel's turns run concurrently
(`asyncio.gather`) through one engine and one store, with the instant model.

Run in a child process (`python -m benchmarks.concurrency ...`, which prints one JSON
object) so its peak memory is its own and not the seeding's of the parent.

`--cache-mb` sets the Redis store's cache of recent messages (`HISTORY_CACHE_MB`), so a run
with it off shows what the cache costs in memory and gives in speed."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from benchmarks.common import LIMITS, POLICY, Conversation, InstantModel, flush, seed
from bot.engine import Engine
from bot.runtime import tune_garbage_collection
from bot.store.base import SessionStore
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore


def _status_kb(field: str) -> int:
    """A field of /proc/self/status: VmRSS is the resident memory now, VmHWM its peak.
    (`ru_maxrss` would do, but Linux carries it over from the parent across fork and exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def _redis_clients(url: str) -> int:
    """Client connections open on the server, this one not counted."""
    client = aioredis.Redis.from_url(url)
    try:
        return int((await client.info("clients"))["connected_clients"]) - 1
    finally:
        await client.aclose()


def _open(backend: str, url: str, cache_mb: int | None, directory: str) -> SessionStore:
    if backend == "sqlite":
        return SqliteStore(Path(directory) / "sessions.sqlite3", POLICY)
    policy = POLICY
    if cache_mb is not None:
        policy = dataclasses.replace(POLICY, history_cache_bytes=cache_mb * 1024 * 1024)
    return RedisStore.from_url(url, policy, cluster=backend == "redis-cluster")


async def run(
    backend: str,
    url: str,
    channels: int,
    turns: int,
    history: int,
    cache_mb: int | None,
    *,
    first_channel: int = 0,
    shared: bool = False,
    keep: bool = False,
) -> dict[str, Any]:
    """`shared`: other processes use the same store at the same time (`benchmarks.scaling`):
    the store is not flushed, and the turns start when the parent writes a line to stdin,
    once every process has seeded its channels (`first_channel` onwards). `keep`: the
    sessions the parent stored are kept (not flushed), idle beside the channels."""
    conversation = Conversation()
    with tempfile.TemporaryDirectory(prefix="bench-conc-") as directory:
        if backend == "redis" and not shared and not keep:
            await flush(url)
        store = _open(backend, url, cache_mb, directory)
        first = 300_000 + first_channel
        scopes = [f"discord:{first + i}" for i in range(channels)]
        await seed(store, [(s, conversation.history(history)) for s in scopes])
        engine = Engine(store, InstantModel(conversation.answer), LIMITS)
        await engine.reply(scopes[0], conversation.user(0))  # scripts loaded, pool warm
        failures: Counter[str] = Counter()

        latencies: list[float] = []

        async def talk(index: int, scope: str) -> int:
            done = 0
            for turn in range(turns):
                try:
                    began = time.perf_counter()
                    await engine.reply(scope, conversation.user(index + turn))
                    latencies.append(time.perf_counter() - began)
                    done += 1
                except Exception as error:  # counted and reported, never hidden
                    cause = error.__cause__
                    why = f" (from {type(cause).__name__}: {cause})" if cause else ""
                    failures[f"{type(error).__name__}{why}"[:160]] += 1
            return done

        rss_before = _status_kb("VmRSS")
        if shared:
            print("ready", file=sys.stderr, flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        started_at = time.time()
        start = time.perf_counter()
        done = await asyncio.gather(*(talk(i, s) for i, s in enumerate(scopes)))
        elapsed = time.perf_counter() - start
        connections = await _redis_clients(url) if backend == "redis" else 0
        await store.close()
    return {
        "backend": backend,
        "cache_mb": (POLICY.history_cache_bytes >> 20 if cache_mb is None else cache_mb)
        if backend == "redis"
        else None,
        "channels": channels,
        "turns_each": turns,
        "history": history,
        "turns_ok": sum(done),
        "turns_failed": sum(failures.values()),
        "failures": dict(failures.most_common(3)),
        "seconds": elapsed,
        "turns_per_second": sum(done) / elapsed,
        "rss_before_mb": rss_before / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "connections": connections,
        "started_at": started_at,
        "ended_at": started_at + elapsed,
        "latencies": latencies if shared else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=("redis", "redis-cluster", "sqlite"), default="redis")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--cache-mb", type=int, default=None, help="default: the bot's")
    parser.add_argument("--first-channel", type=int, default=0)
    parser.add_argument("--shared", action="store_true", help="see `run`")
    parser.add_argument("--keep", action="store_true", help="see `run`")
    args = parser.parse_args()
    tune_garbage_collection()  # the bot's process, as `python -m bot` sets it up
    result = asyncio.run(
        run(
            args.backend,
            args.url,
            args.channels,
            args.turns,
            args.history,
            args.cache_mb,
            first_channel=args.first_channel,
            shared=args.shared,
            keep=args.keep,
        )
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
