"""The fake's gateway: Discord's websocket protocol as discord.py 2.7.1 speaks it.

HELLO, heartbeat ACKs, IDENTIFY -> READY + GUILD_CREATE (or close code 4004 for a wrong
token, 4014 for a privileged intent not switched on in the Developer Portal, 4010 for a
`shard` that is not `[shard_id, num_shards]` with `shard_id < num_shards`), RESUME with
replay of what a session missed, and REQUEST_MEMBERS. A session that identified with a
shard gets only that shard's guilds and their events (a guild's shard is `(guild_id >> 22) %
num_shards`), and events outside guilds (DMs) only on shard 0; one without a shard gets all.
Events carry per-session sequence numbers and respect the intents the client identified
with, including Discord's blanking of message content for a bot without the MESSAGE_CONTENT
intent. Frames are plain text:
discord.py asks for zlib-stream compression but only decompresses binary frames.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.discord_world import BOT_ID, GUILD_ID, Intent, World

Shard = tuple[int, int]  # (shard_id, num_shards), as IDENTIFY's `shard` names it


def shard_of(guild_id: int | None, num_shards: int) -> int:
    """The shard Discord delivers a guild's events on; events outside guilds go to shard 0."""
    return 0 if guild_id is None else (guild_id >> 22) % num_shards


def _valid_shard(value: object) -> Shard | None:
    if not isinstance(value, list) or len(value) != 2:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        return None
    shard_id, num_shards = value
    return (shard_id, num_shards) if 0 <= shard_id < num_shards else None


_Frame = tuple[str, str | None]  # the JSON text sent, and its event name (None for non-dispatch)
RESUMABLE_HISTORY = 1000
HELLO, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, REQUEST_MEMBERS = 10, 1, 2, 6, 7, 8
INVALID_SESSION, HEARTBEAT_ACK = 9, 11
AUTHENTICATION_FAILED, INVALID_SHARD, DISALLOWED_INTENTS = 4004, 4010, 4014
UNKNOWN_ERROR = 4000
_DROP = "drop"
"""Put in a session's frame queue: its websocket is closed instead of sent a frame."""


def _op(op: int, data: Any) -> str:
    return json.dumps({"op": op, "d": data, "s": None, "t": None})


class _Session:
    """One gateway session; it outlives its websocket so a RESUME can replay what it missed."""

    def __init__(self, intents: int, shard: Shard | None) -> None:
        self.id = uuid.uuid4().hex
        self.intents = intents
        self.shard = shard
        self.seq = 0
        self.delivered: list[tuple[str, dict[str, Any]]] = []  # dispatched events, in order
        self.history: deque[tuple[int, _Frame]] = deque(maxlen=RESUMABLE_HISTORY)
        self.queue: asyncio.Queue[_Frame | None] | None = None  # None while disconnected


def _without_content(message: dict[str, Any]) -> dict[str, Any]:
    """What Discord sends a bot lacking the MESSAGE_CONTENT intent.

    Content survives only in DMs, in the bot's own messages and in messages mentioning it.
    """
    bot = str(BOT_ID)
    keeps = (
        "guild_id" not in message
        or message["author"]["id"] == bot
        or any(m["id"] == bot for m in message.get("mentions", []))
    )
    redacted = message if keeps else message | {"content": "", "embeds": [], "attachments": []}
    referenced = message.get("referenced_message")
    if referenced:
        redacted = redacted | {"referenced_message": _without_content(referenced)}
    return redacted


class Gateway:
    """Gateway sessions and the websockets currently carrying them.

    `dispatch_locked` may be called from any thread (with the lock held); frames are handed
    to the server loop with `call_soon_threadsafe`, under the lock, so they leave in
    sequence order.
    """

    def __init__(
        self,
        *,
        lock: threading.Lock,
        world: World,
        token: str,
        gateway_url: str,
        heartbeat_interval_ms: int,
        not_websocket: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> None:
        self.lock, self.world, self.token = lock, world, token
        self.gateway_url = gateway_url
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.not_websocket = not_websocket
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        self.sessions: dict[str, _Session] = {}
        self.sockets: set[web.WebSocketResponse] = set()
        self.identify_payload: dict[str, Any] | None = None
        self.portal_intents = Intent.PRIVILEGED  # the privileged intents switched on
        self.resumes = 0
        self.refused_connections = 0
        self.guild_creates_delivered = 0
        self.dispatched: list[tuple[str, dict[str, Any]]] = []
        self.closed_until: threading.Event | None = None
        """While set and not yet set off, new gateway connections are refused (503)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        if not ws.can_prepare(request).ok:
            return await self.not_websocket(request)
        if self.closed_until is not None and not self.closed_until.is_set():
            with self.lock:
                self.refused_connections += 1
            return web.Response(status=503, text="gateway unavailable")
        await ws.prepare(request)
        self.sockets.add(ws)
        queue: asyncio.Queue[_Frame | None] = asyncio.Queue()
        writer = asyncio.create_task(self._write(ws, queue))
        queue.put_nowait((_op(HELLO, {"heartbeat_interval": self.heartbeat_interval_ms}), None))
        session: _Session | None = None
        try:
            async for message in ws:
                if message.type is not WSMsgType.TEXT:
                    continue
                packet = json.loads(message.data)
                op, data = packet.get("op"), packet.get("d")
                if op == HEARTBEAT:
                    queue.put_nowait((_op(HEARTBEAT_ACK, None), None))
                elif op == IDENTIFY:
                    refusal = self._refusal(data)
                    if refusal is not None:
                        await ws.close(code=refusal[0], message=refusal[1])
                    else:
                        session = self._identify(data, queue)
                elif op == RESUME:
                    session = self._resume(data, queue)
                    if session is None:
                        queue.put_nowait((_op(INVALID_SESSION, False), None))
                elif op == REQUEST_MEMBERS and session is not None:
                    self._send_members(session, data)
        finally:
            self.sockets.discard(ws)
            with self.lock:
                if session is not None and session.queue is queue:
                    session.queue = None
                    if ws.close_code in (1000, 1001):  # a clean close ends the session
                        self.sessions.pop(session.id, None)
            queue.put_nowait(None)
            await writer
        return ws

    async def close_all(self) -> None:
        for ws in list(self.sockets):
            await ws.close(code=1001, message=b"fake Discord stopping")

    async def _write(self, ws: web.WebSocketResponse, queue: asyncio.Queue[_Frame | None]) -> None:
        while (frame := await queue.get()) is not None:
            text, event = frame
            if text is _DROP:
                await ws.close(code=UNKNOWN_ERROR, message=b"fake Discord dropped the connection")
                return
            try:
                await ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return
            if event == "GUILD_CREATE":
                with self.lock:
                    self.guild_creates_delivered += 1

    def _refusal(self, data: dict[str, Any]) -> tuple[int, bytes] | None:
        """The close code and reason Discord ends the connection with instead of READY."""
        with self.lock:
            self.identify_payload = data
            if data.get("token") != self.token:
                return AUTHENTICATION_FAILED, b"Authentication failed."
            if int(data.get("intents") or 0) & Intent.PRIVILEGED & ~self.portal_intents:
                return DISALLOWED_INTENTS, b"Disallowed intent(s)."
            if "shard" in data and _valid_shard(data["shard"]) is None:
                return INVALID_SHARD, b"Invalid shard."
        return None

    def _identify(self, data: dict[str, Any], queue: asyncio.Queue[_Frame | None]) -> _Session:
        with self.lock:
            shard = _valid_shard(data["shard"]) if "shard" in data else None
            session = _Session(int(data.get("intents") or 0), shard)
            session.queue = queue
            self.sessions[session.id] = session
            guilds = [g for g in self.world.guild_ids if self._carries(session, g)]
            ready = {
                "v": 10,
                "user": self.world.bot_user | {"verified": True, "mfa_enabled": False, "flags": 0},
                "guilds": [{"id": str(g), "unavailable": True} for g in guilds],
                "session_id": session.id,
                "session_type": "normal",
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(BOT_ID), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": [],
                "user_settings": {},
            }
            if "shard" in data:
                ready["shard"] = data["shard"]
            self._send_locked(session, "READY", ready)
            for guild_id in guilds:
                self._send_locked(session, "GUILD_CREATE", self.world.guild_payload(guild_id))
        return session

    @staticmethod
    def _carries(session: _Session, guild_id: int | None) -> bool:
        """Whether Discord delivers this guild's events (None: a DM's) on the session."""
        if session.shard is None:
            return True
        shard_id, num_shards = session.shard
        return shard_of(guild_id, num_shards) == shard_id

    def _resume(self, data: dict[str, Any], queue: asyncio.Queue[_Frame | None]) -> _Session | None:
        with self.lock:
            session = self.sessions.get(data.get("session_id") or "")
            if session is None or data.get("token") != self.token:
                return None
            session.queue = queue
            for seq, frame in session.history:
                if seq > int(data.get("seq") or 0):
                    queue.put_nowait(frame)
            self._send_locked(session, "RESUMED", {})
            self.resumes += 1
        return session

    def _send_members(self, session: _Session, data: dict[str, Any]) -> None:
        """Answer REQUEST_MEMBERS, which a client with the members intent may send."""
        wanted = {int(u) for u in data.get("user_ids") or []}
        with self.lock:
            members = [
                self.world.member_payload(uid)
                for uid in self.world.member_roles
                if not wanted or uid in wanted
            ]
            chunk = {
                "guild_id": str(data.get("guild_id") or GUILD_ID),
                "members": members,
                "chunk_index": 0,
                "chunk_count": 1,
                "not_found": [],
                "nonce": data.get("nonce"),
            }
            self._send_locked(session, "GUILD_MEMBERS_CHUNK", chunk)

    def _send_locked(self, session: _Session, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        frame = (json.dumps({"op": 0, "t": event, "s": session.seq, "d": data}), event)
        session.delivered.append((event, data))
        session.history.append((session.seq, frame))
        if session.queue is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(session.queue.put_nowait, frame)

    def dispatch_locked(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to every session of its shard that the intents allow (a
        disconnected one: on RESUME)."""
        self.dispatched.append((event, copy.deepcopy(data)))
        guild_id = int(data["guild_id"]) if data.get("guild_id") else None
        for session in self.sessions.values():
            if not self._carries(session, guild_id):
                continue
            if event.startswith("MESSAGE_"):
                in_dm = "guild_id" not in data
                needed = Intent.DIRECT_MESSAGES if in_dm else Intent.GUILD_MESSAGES
                if not session.intents & needed:
                    continue
                deleted = event in ("MESSAGE_DELETE", "MESSAGE_DELETE_BULK")
                if not deleted and not session.intents & Intent.MESSAGE_CONTENT:
                    self._send_locked(session, event, _without_content(data))
                    continue
            elif event.startswith(("THREAD_", "CHANNEL_")) and not session.intents & Intent.GUILDS:
                continue
            self._send_locked(session, event, data)

    def drop(self, shard: Shard | None, closed_until: threading.Event) -> None:
        """Close the websockets carrying `shard`'s sessions as a failing gateway does (4000:
        the client may resume), and refuse new connections until `closed_until` is set."""
        self.closed_until = closed_until
        with self.lock:
            queues = [
                s.queue for s in self.sessions.values() if s.queue is not None and s.shard == shard
            ]
        for queue in queues:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(queue.put_nowait, (_DROP, None))

    def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to every connected session; discord.py then resumes."""
        with self.lock:
            queues = [s.queue for s in self.sessions.values() if s.queue is not None]
        for queue in queues:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(queue.put_nowait, (_op(RECONNECT, None), None))
