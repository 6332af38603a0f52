"""Reference points for splitting a turn's time: the cost of one bare Redis round trip from
this client, of one round trip bringing a reply as large as `begin_turn`'s, and of decoding
the loaded messages, each measured on its own; and where a session's first turn in a process
goes, against a hand-written list reading the same messages (`first_turn_parts`, or
`python -m benchmarks.breakdown` for that table alone)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from benchmarks.common import BUDGET_BYTES, POLICY, Conversation, percentile, redis_server, seed
from bot.store.base import Ticket, decode_message_array, encode_message
from bot.store.recent import RecentWindow
from bot.store.redis import RedisStore, session_key


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


@dataclass(frozen=True)
class FirstTurnParts:
    """A session's first turn in a process on our Redis store, split where it can be
    measured: server time from `INFO commandstats` (one kind of call at a time, so each
    figure is that call's own), client pieces timed alone in this process. Microseconds."""

    sessions: int
    history: int
    loaded: int
    """Messages the first `begin_turn` brought (all that fit the budget)."""
    reply_bytes: int
    """Their stored size: what crosses the wire (and, for our store, the Lua script)."""
    begin_first: float
    """`begin_turn` inside Redis, nothing cached in the process: on a single Redis its
    script and the LRANGE of the session's newest messages, sent in one transaction."""
    begin_steady: float
    """The same script once the process holds the window (it sends only what is new)."""
    finish: float
    """`finish_turn`'s script inside Redis."""
    lrange: float
    """A plain LRANGE of the same messages inside Redis (what the hand-written list pays)."""
    list_write: float
    """The list's MULTI RPUSH EXPIRE inside Redis."""
    decode_array: float
    """Joining the loaded messages and one `decode_message_array` (what our store does)."""
    decode_each: float
    """`json.loads` of each message (what the hand-written list does)."""
    window: float
    """Measuring the messages' sizes and building the process's window from them."""
    begin_call: float
    """A first `begin_turn` as its caller waits for it, p50 (round trip included)."""
    finish_call: float
    """The `finish_turn` after it, p50."""
    read_call: float
    """The list's LRANGE and `json.loads` of each message, p50."""
    write_call: float
    """The list's MULTI RPUSH EXPIRE, p50."""

    @property
    def script_overhead(self) -> float:
        """Server time our two scripts spend beyond the list's two calls on a first turn."""
        return self.begin_first + self.finish - self.lrange - self.list_write


SCRIPT_CALLS = ("fcall", "evalsha")
"""How the store's scripts are called (`bot.store.redis_functions`)."""


async def _server_time(
    client: aioredis.Redis,
    work: Callable[[], Awaitable[None]],
    commands: tuple[str, ...],
    units: int,
) -> float:
    """Server time of `commands` while `work` runs, per unit of work (usec). A script's own
    entry (FCALL, or EVALSHA) includes the commands it calls, and EXEC the commands of its
    transaction, which are also counted on their own: when `work` ran transactions, their
    MULTI and EXEC are counted instead of `commands`."""
    await client.config_resetstat()
    await work()
    stats = await client.info("commandstats")

    def usec(names: tuple[str, ...]) -> float:
        return sum(float(stats.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in names)

    transactions = usec(("multi", "exec"))
    return (transactions or usec(commands)) / units


def _p50_us(work: Callable[[], object], samples: int = 200) -> float:
    out: list[int] = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        work()
        out.append(time.perf_counter_ns() - start)
    return percentile(out, 50) / 1e3


async def first_turn_parts(
    url: str, conversation: Conversation, sessions: int = 100, history: int = 100
) -> FirstTurnParts:
    """`sessions` sessions of `history` messages each take a first turn, then a second one,
    on a store fresh to them; the scripts' server time is read for each kind of call."""
    direct = aioredis.Redis.from_url(url, decode_responses=True)
    store = RedisStore.from_url(url, POLICY)
    scopes = [f"discord:{900_000 + i}" for i in range(sessions)]
    stored = conversation.history(history)
    added = [conversation.user(0), dict(conversation.answer)]
    try:
        await seed(store, [(s, stored) for s in scopes])
        warm = await store.begin_turn("discord:899999", Ticket.now(), BUDGET_BYTES, 60_000)
        await store.finish_turn(warm, added)  # the scripts loaded
        turns = []
        calls: dict[str, list[int]] = {"begin": [], "finish": [], "read": [], "write": []}

        def timed(part: str, start: int) -> None:
            calls[part].append(time.perf_counter_ns() - start)

        async def begin_all() -> None:
            for scope in scopes:
                start = time.perf_counter_ns()
                turns.append(await store.begin_turn(scope, Ticket.now(), BUDGET_BYTES, 60_000))
                timed("begin", start)

        async def finish_all() -> None:
            for turn in turns:
                start = time.perf_counter_ns()
                await store.finish_turn(turn, added)
                timed("finish", start)
            turns.clear()

        n = len(scopes)
        begin_first = await _server_time(direct, begin_all, SCRIPT_CALLS, n)
        loaded = len(turns[0].recent)
        finish = await _server_time(direct, finish_all, SCRIPT_CALLS, n)
        first_calls = {part: list(calls[part]) for part in ("begin", "finish")}
        begin_steady = await _server_time(direct, begin_all, SCRIPT_CALLS, n)
        await finish_all()

        texts = [encode_message(m) for m in stored[-loaded:]]
        key = session_key(scopes[0], "default", "messages")
        list_key = "bench:first-turn-list"
        await direct.rpush(list_key, *texts)

        async def lrange_all() -> None:
            for _ in scopes:
                start = time.perf_counter_ns()
                [json.loads(text) for text in await direct.lrange(list_key, 0, -1)]
                timed("read", start)

        async def write_all() -> None:
            for _ in scopes:
                start = time.perf_counter_ns()
                async with direct.pipeline(transaction=True) as tx:
                    tx.rpush(key + ":copy", *(json.dumps(m) for m in added))
                    tx.expire(key + ":copy", 3600)
                    await tx.execute()
                timed("write", start)

        lrange = await _server_time(direct, lrange_all, ("lrange",), n)
        list_write = await _server_time(direct, write_all, ("multi", "rpush", "expire", "exec"), n)
        await direct.delete(list_key, key + ":copy")
    finally:
        await store.close()
        await direct.aclose()

    decoded = decode_message_array("bench", "[" + ",".join(texts) + "]")

    def window() -> None:
        sizes = list(map(len, texts)) if all(map(str.isascii, texts)) else []
        RecentWindow("default", "g", 0, 0, BUDGET_BYTES, True).extended(
            decoded, sizes, loaded, loaded
        ).newest_within(BUDGET_BYTES)

    return FirstTurnParts(
        sessions=sessions,
        history=history,
        loaded=loaded,
        reply_bytes=sum(len(t.encode()) for t in texts),
        begin_first=begin_first,
        begin_steady=begin_steady,
        finish=finish,
        lrange=lrange,
        list_write=list_write,
        decode_array=_p50_us(lambda: decode_message_array("b", "[" + ",".join(texts) + "]")),
        decode_each=_p50_us(lambda: [json.loads(t) for t in texts]),
        window=_p50_us(window),
        begin_call=percentile(first_calls["begin"], 50) / 1e3,
        finish_call=percentile(first_calls["finish"], 50) / 1e3,
        read_call=percentile(calls["read"], 50) / 1e3,
        write_call=percentile(calls["write"], 50) / 1e3,
    )


def render_first_turn(parts: FirstTurnParts) -> str:
    """The parts as a Markdown table, ours beside the hand-written list."""
    p = parts

    def us(value: float) -> str:
        return f"{value:.0f}"

    rows = [
        ("Part (µs; p50 client side, mean per call server side)", "ours", "list"),
        ("---", "---:", "---:"),
        (f"messages loaded ({p.reply_bytes:,} bytes)", str(p.loaded), str(p.loaded)),
        (
            "read inside Redis: `begin_turn` (script, LRANGE beside it) / LRANGE",
            f"{p.begin_first:.0f}",
            f"{p.lrange:.0f}",
        ),
        ("- the same script in steady state (only what is new)", f"{p.begin_steady:.0f}", ""),
        (
            "write inside Redis: `finish_turn` script / MULTI RPUSH EXPIRE",
            f"{p.finish:.0f}",
            f"{p.list_write:.0f}",
        ),
        (
            "decoding: one JSON array / json.loads each",
            f"{p.decode_array:.0f}",
            f"{p.decode_each:.0f}",
        ),
        ("the process's window (sizes, cut to the budget)", f"{p.window:.0f}", ""),
        (
            "the read as its caller waits for it (round trip included)",
            us(p.begin_call),
            us(p.read_call),
        ),
        ("the write as its caller waits for it", us(p.finish_call), us(p.write_call)),
    ]
    lines = [
        f"## A session's first turn in a process on Redis ({p.sessions} sessions of"
        f" {p.history} messages)",
        "",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        f"Our two calls take {p.script_overhead:.0f} µs more inside Redis than the list's two."
        " A first turn's messages come by a plain LRANGE sent with the `begin_turn` script in"
        " one transaction, not through Lua (Redis copies each byte a script reads or returns"
        " at several times the cost of a plain reply); the first turn's read takes"
        f" {p.begin_first - p.begin_steady:.0f} µs more than a steady one's, which sends only"
        " what is new. The rest is the calls the scripts make for the claim, queue, lock,"
        " checks and caps (counted in the round-trips table).",
    ]
    return "\n".join(lines)


async def _main(sessions: int, history: int) -> None:
    with redis_server() as server:
        parts = await first_turn_parts(server.url, Conversation(), sessions, history)
    print(render_first_turn(parts))
    print(f"\nLoad average (1 min): {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--history", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(_main(args.sessions, args.history))
