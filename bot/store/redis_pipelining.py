"""One Redis connection that every call in flight shares, their commands written together
(auto-pipelining, as ioredis and Lettuce do it; redis-py does not).

Why: with redis-py, each call takes a connection from the pool, writes its command with one
system call, reads its reply with another and gives the connection back. With a thousand
channels talking, a process spends most of its time there (a `send` costs tens of µs on a
small VM), not in the bot. Here the commands of every call made in one turn of the event
loop go out in one write, and the replies are read as they come, in order, by the
connection itself: no pool, no task per call.

A reply belongs to the call that sent its command: Redis answers in order, and a call that
gave up (its deadline passed, or it was cancelled) leaves its place in the line, so its late
reply is read and dropped, never handed to a later call. A lost connection fails the calls
waiting on it; the next call opens a new one. Each command gets its reply within the call
deadline or fails with `TimeoutError`: the connection keeps the deadlines, with one timer for
all the calls on it. A connection that has said nothing for a while, with calls waiting, may
be silently dead (a frozen server, a network that dropped it): it is closed then (and by
`drop_if_silent`), so the next call opens a new one instead of waiting behind it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError
from redis.typing import EncodableT

Packer = Callable[[tuple[EncodableT, ...]], bytes]
"""How a command becomes the bytes Redis reads."""


class _Replies(asyncio.Protocol):
    """The connection: commands out, replies back to the calls waiting, in order."""

    def __init__(self, encoding: str, errors: str, call_timeout: float) -> None:
        self.reader = hiredis.Reader(encoding=encoding, errors=errors)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.deadlines: deque[float] = deque()
        """When each waiting call gives up (event-loop time), in the same order."""
        self.call_timeout = call_timeout
        self._watch: asyncio.TimerHandle | None = None
        self.outgoing: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.heard_at = 0.0
        """When the server last said something, or the first call began waiting since."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.heard_at = time.monotonic()
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except Exception as error:  # a reply that cannot be read: as redis-py, hang up
                if self.waiting and not self.waiting[0].done():
                    self.waiting.popleft().set_exception(error)
                self.abort()
                return
            if reply is False:
                return
            waiter = self.waiting.popleft()
            self.deadlines.popleft()
            if waiter.done():  # its call gave up
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = RedisConnectionError(
            "Connection closed by server." if exc is None else f"Connection lost: {exc}"
        )
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.deadlines.clear()
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, *packed: bytes) -> list[asyncio.Future[Any]]:
        """One reply awaited per command, each failing with `TimeoutError` if it has not
        come within the call deadline (`_give_up`). A call alone on the connection is
        written at once; calls made while others wait are written together once this turn
        of the event loop is done."""
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in packed]
        deadline = loop.time() + self.call_timeout
        self.deadlines.extend([deadline] * len(waiters))
        if self._watch is None:
            self._watch = loop.call_at(deadline, self._give_up)
        if not self.waiting:
            self.heard_at = time.monotonic()  # silence counts from the first call that waits
            self.waiting.extend(waiters)
            if not self.closed and self.transport is not None:
                self.transport.write(b"".join(packed))
            return waiters
        self.waiting.extend(waiters)
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.extend(packed)
        return waiters

    def _give_up(self) -> None:
        """Fail the calls past their deadline (their late replies are dropped), and hang up
        if the server has been silent for half the deadline: it may be frozen, or the path
        to it dropped, so the next call opens a new connection instead of waiting behind
        this one. One timer serves every call on the connection: set for the first call,
        then for the next deadline whenever it fires; a timer per call (as `asyncio.timeout`
        sets and cancels) cost each call 10-20 µs on a small VM."""
        self._watch = None
        now = asyncio.get_running_loop().time()
        given_up, upcoming = False, None
        for waiter, deadline in zip(self.waiting, self.deadlines, strict=True):
            if waiter.done():
                continue
            if deadline <= now:
                waiter.set_exception(TimeoutError("Redis did not answer within the call deadline"))
                given_up = True
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        if given_up and self.drop_if_silent(self.call_timeout / 2):
            return
        if upcoming is not None:
            self._watch = asyncio.get_running_loop().call_at(upcoming, self._give_up)

    def _flush(self) -> None:
        data = b"".join(self.outgoing)
        self.outgoing.clear()
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def drop_if_silent(self, seconds: float) -> bool:
        """Close the connection if calls wait on it and it has said nothing for `seconds`."""
        if self.waiting and time.monotonic() - self.heard_at >= seconds:
            self.abort()
            return True
        return False

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # connection_lost fails whoever still waits


def _retrieve(done: asyncio.Future[Any]) -> None:
    """Mark a failure as seen: it is reported another way (a failed opening to the calls
    waiting for it, if any are left; a command refused in a transaction by EXEC)."""
    if not done.cancelled():
        done.exception()


def raised(reply: Any) -> Any:
    """An element of a transaction's reply (`AutoPipeline.transaction`), an error raised as
    redis-py raises it (`NoScriptError`, `ResponseError` ...)."""
    if isinstance(reply, hiredis.ReplyError):
        raise BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return reply


class AutoPipeline:
    """Calls to one Redis server (TCP, RESP2) over one shared connection."""

    def __init__(
        self,
        pack: Packer,
        *,
        host: str,
        port: int,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        encoding: str = "utf-8",
        errors: str = "strict",
        connect_timeout: float = 2.0,
        call_timeout: float = 5.0,
    ) -> None:
        """`call_timeout`: how long each command waits for its reply (`_Replies.send`)."""
        self._pack = pack
        self._call_timeout = call_timeout
        self._address = (host, port)
        self._hello: list[tuple[EncodableT, ...]] = []
        if password is not None:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self._decoding = (encoding, errors)
        self._connect_timeout = connect_timeout
        self._replies: _Replies | None = None
        self._opening: asyncio.Task[_Replies] | None = None

    async def call(self, *args: EncodableT) -> Any:
        replies = await self._connected()
        return await replies.send(self._pack(args))[0]

    async def transaction(self, *commands: tuple[EncodableT, ...]) -> list[Any]:
        """`commands` run as one (MULTI ... EXEC), written in one go: EXEC's reply, one
        element per command, an error among them as its exception object (hiredis's
        `ReplyError`, as `raised` turns it into redis-py's). A command refused when queued
        fails the whole, with that refusal (`OutOfMemoryError`, say)."""
        replies = await self._connected()
        packed = [self._pack(("MULTI",)), *map(self._pack, commands), self._pack(("EXEC",))]
        *queued, done = replies.send(*packed)
        for waiter in queued:  # 'OK' and 'QUEUED', or the refusal EXEC also reports
            waiter.add_done_callback(_retrieve)
        try:
            result: list[Any] = await done
        except ExecAbortError:  # the refusal itself says more (Redis full, say)
            for waiter in queued:  # answered in order, so before EXEC
                refusal = None if waiter.cancelled() else waiter.exception()
                if refusal is not None:
                    raise refusal from None
            raise
        return result

    async def _connected(self) -> _Replies:
        """The open connection, or a new one: every call that finds none waits for the same
        new one, and a call that gives up does not stop it opening for the others."""
        if self._replies is not None and not self._replies.closed:
            return self._replies
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._connect())
            self._opening.add_done_callback(_retrieve)
        return await asyncio.shield(self._opening)

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            transport, replies = await loop.create_connection(
                lambda: _Replies(*self._decoding, self._call_timeout), *self._address
            )
            try:
                await asyncio.gather(*replies.send(*map(self._pack, self._hello)))
            except BaseException:
                transport.close()
                raise
        self._replies = replies
        return replies

    def drop_if_silent(self, seconds: float) -> None:
        """Close the connection if calls wait on it and it has said nothing for `seconds`."""
        if self._replies is not None:
            self._replies.drop_if_silent(seconds)

    async def close(self) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        if self._replies is not None and self._replies.transport is not None:
            self._replies.transport.close()
        self._replies = None
