"""Reference points for splitting a turn's time: the cost of one bare Redis round trip from
this client, of one round trip bringing a reply as large as `begin_turn`'s, and of decoding
the loaded messages, each measured on its own."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from benchmarks.common import Conversation, percentile
from bot.store.base import decode_message_array, encode_message


async def ping_ns(url: str, samples: int) -> list[int]:
    """One PING at a time with the bot's client library (redis.asyncio): the floor that
    every round trip of a turn pays over this link."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        for _ in range(50):
            await client.ping()
        out: list[int] = []
        for _ in range(samples):
            start = time.perf_counter_ns()
            await client.ping()
            out.append(time.perf_counter_ns() - start)
        return out
    finally:
        await client.aclose()


async def bulk_reply_ns(
    url: str, conversation: Conversation, messages: int, samples: int
) -> list[int]:
    """One LRANGE of as many messages as a first turn's `begin_turn` returns, one reply
    element each as it returns them, with the same client: a round trip plus moving and
    parsing that reply, with little server work."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    key = "bench:reply"
    try:
        await client.delete(key)
        await client.rpush(key, *(encode_message(m) for m in conversation.history(messages)))
        for _ in range(20):
            await client.lrange(key, 0, -1)
        out: list[int] = []
        for _ in range(samples):
            start = time.perf_counter_ns()
            await client.lrange(key, 0, -1)
            out.append(time.perf_counter_ns() - start)
        await client.delete(key)
        return out
    finally:
        await client.aclose()


def decode_ns(conversation: Conversation, messages: int, samples: int = 200) -> float:
    """p50 time of joining `messages` stored messages and `decode_message_array` on them
    (what `begin_turn` does with the elements Redis returns)."""
    stored = [encode_message(m) for m in conversation.history(messages)]
    out: list[int] = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        decode_message_array("bench", "[" + ",".join(stored) + "]")
        out.append(time.perf_counter_ns() - start)
    return percentile(out, 50)
