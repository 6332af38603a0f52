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


def _as_array(conversation: Conversation, messages: int) -> str:
    """The loaded messages as `begin_turn` returns them: one JSON array."""
    return "[" + ",".join(encode_message(m) for m in conversation.history(messages)) + "]"


async def bulk_reply_ns(
    url: str, conversation: Conversation, messages: int, samples: int
) -> list[int]:
    """One GET of a string as large as `begin_turn`'s reply, with the same client: a round
    trip plus moving and parsing that reply, with next to no server work."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    key = "bench:reply"
    try:
        await client.set(key, _as_array(conversation, messages))
        for _ in range(20):
            await client.get(key)
        out: list[int] = []
        for _ in range(samples):
            start = time.perf_counter_ns()
            await client.get(key)
            out.append(time.perf_counter_ns() - start)
        await client.delete(key)
        return out
    finally:
        await client.aclose()


def decode_ns(conversation: Conversation, messages: int, samples: int = 200) -> float:
    """p50 time of `decode_message_array` on `messages` messages (what `begin_turn` does
    with the array Redis returns)."""
    stored = _as_array(conversation, messages)
    out: list[int] = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        decode_message_array("bench", stored)
        out.append(time.perf_counter_ns() - start)
    return percentile(out, 50)
