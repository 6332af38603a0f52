"""A local Discord (REST + gateway) that the real, unmodified discord.py client logs into.

Tests drive whole conversations through it: a user speaks (`user_says`), invokes a slash
command (`invoke`), and the test reads what the bot posted (`messages_in`,
`wait_interaction_reply`). The server runs in a background thread with its own event loop,
so the bot under test may run in the test's loop or in a subprocess; every piece of state is
guarded by one lock and the `wait_*` helpers poll, so they work from any loop.

    with FakeDiscord() as fake, fake.point_discord_py_here():
        client = discord.Client(intents=..., guild_ready_timeout=0.1)
        ...await client.start(fake.token)...
        fake.user_says(fake.general_id, fake.member, "hello")
        await fake.wait_bot_messages(fake.general_id, 1)

A bot in a subprocess must set `discord.http.Route.BASE = fake.api_base` and
`discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Self, TypeVar

import discord.gateway
import discord.http
import yarl
from aiohttp import web

from tests.fakes.discord_interactions import (
    APPLICATION_COMMAND,
    ATTACHMENT_SIZE_LIMIT,
    AUTOCOMPLETE,
    AppCommands,
    CommandRefused,
    InteractionReply,
    Interactions,
)
from tests.fakes.discord_rest import API, RecordedRequest, Refusal, RestApi
from tests.fakes.discord_websocket import Gateway
from tests.fakes.discord_world import (
    ADMIN_ID,
    BOT_ID,
    GENERAL_ID,
    GUILD_ID,
    MEMBER_ID,
    OTHER_BOT_ID,
    OTHER_CHANNEL_ID,
    OTHER_GUILD_ID,
    OTHER_MEMBER_ID,
    PRIVATE_THREAD,
    PUBLIC_THREAD,
    RANDOM_ID,
    DiscordError,
    Intent,
    Message,
    World,
)

__all__ = ["CommandRefused", "FakeDiscord", "InteractionReply", "Message"]

T = TypeVar("T")


class _DiscordPyPointer(contextlib.AbstractContextManager["_DiscordPyPointer"]):
    """Points discord.py's class-level endpoints at the fake until `undo()` or the `with` ends."""

    def __init__(self, api_base: str, gateway_url: str) -> None:
        websocket = discord.gateway.DiscordWebSocket
        self._saved = (discord.http.Route.BASE, websocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = api_base
        websocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)

    def undo(self) -> None:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


class FakeDiscord:
    """Discord's REST API and gateway on 127.0.0.1, with one guild and its people.

    `rate_limit` requests per `rate_window` seconds per bucket is what the rate-limit headers
    announce (and enforce with 429). Discord's real message bucket is 5 per 5 s; the looser
    default keeps tests fast while discord.py's own throttling code still runs.

    `portal_intents` are the privileged intents (`Intent.PRIVILEGED` bits) switched on for the
    application in the Developer Portal; an IDENTIFY asking for any other is closed with 4014.

    `second_guild` adds a guild (`other_guild_id`, with the channel `elsewhere_id`) on the
    other shard of two than `guild_id`'s, for sharding; `recommended_shards` is the shard
    count `/gateway/bot` answers (what discord.py's AutoShardedClient runs by default).
    """

    token = "test-token"

    def __init__(
        self,
        *,
        rate_limit: int = 50,
        rate_window: float = 1.0,
        heartbeat_interval_ms: int = 41_250,
        portal_intents: int = Intent.PRIVILEGED,
        second_guild: bool = False,
        recommended_shards: int = 1,
    ) -> None:
        self._lock = threading.Lock()
        # The port is reserved now, so the addresses below are valid before start().
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        self.http_base = f"http://127.0.0.1:{port}"
        self.api_base = f"{self.http_base}/api/v10"
        self.gateway_url = f"ws://127.0.0.1:{port}/"

        # The world reports changes through the gateway, which reads the world: bind late.
        self._world = World(
            self.http_base,
            lambda event, data: self._gateway.dispatch_locked(event, data),
            second_guild=second_guild,
        )
        self._commands = AppCommands(self._world)
        self._interactions = Interactions(self._world, self._commands)
        self._rest = RestApi(
            lock=self._lock,
            world=self._world,
            commands=self._commands,
            interactions=self._interactions,
            token=self.token,
            rate_limit=rate_limit,
            rate_window=rate_window,
        )
        self._gateway = Gateway(
            lock=self._lock,
            world=self._world,
            token=self.token,
            gateway_url=self.gateway_url,
            heartbeat_interval_ms=heartbeat_interval_ms,
            not_websocket=self._rest.unhandled,
        )
        self._gateway.portal_intents = portal_intents
        self._rest.recommended_shards = recommended_shards
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

        self.bot_id = self.application_id = BOT_ID
        self.bot_user: dict[str, Any] = self._world.bot_user
        self.admin_id, self.member_id = ADMIN_ID, MEMBER_ID
        self.admin: dict[str, Any] = self._world.users[ADMIN_ID]
        self.member: dict[str, Any] = self._world.users[MEMBER_ID]
        self.other_member: dict[str, Any] = self._world.users[OTHER_MEMBER_ID]
        """A second member without Manage Server, for what one member may not do to another's."""
        self.other_bot: dict[str, Any] = self._world.users[OTHER_BOT_ID]
        """Another application's bot, which speaks in channels too."""
        self.guild_id = GUILD_ID
        self.general_id, self.random_id = GENERAL_ID, RANDOM_ID
        self.channel_ids = {"general": GENERAL_ID, "random": RANDOM_ID}
        self.other_guild_id, self.elsewhere_id = OTHER_GUILD_ID, OTHER_CHANNEL_ID

    # Lifecycle

    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = self._gateway.loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as error:
                failure.append(error)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-discord", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError("the fake Discord did not start") from next(iter(failure), None)
        return self

    async def _serve(self) -> None:
        # Large enough for ten files at Discord's limit, so the fake (not aiohttp) refuses.
        app = web.Application(
            middlewares=[self._rest.middleware], client_max_size=12 * ATTACHMENT_SIZE_LIMIT
        )
        app.router.add_get("/", self._gateway.handle)
        app.router.add_routes(self._rest.routes())
        app.router.add_route("*", "/{tail:.*}", self._rest.unhandled)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            self._socket.close()
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        await self._gateway.close_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def point_discord_py_here(self) -> _DiscordPyPointer:
        """Make discord.py (in this process) talk to the fake; usable as a context manager."""
        return _DiscordPyPointer(self.api_base, self.gateway_url)

    def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send any gateway event to every session (a disconnected one gets it on RESUME)."""
        with self._lock:
            self._gateway.dispatch_locked(event, data)

    def request_reconnect(self) -> None:
        """Send op 7 RECONNECT, as Discord does before moving a session; the client resumes."""
        self._gateway.request_reconnect()

    def drop_shard(self, shard: tuple[int, int] | None, closed_until: threading.Event) -> None:
        """The gateway drops `shard`'s connection (None: unsharded ones) and refuses every
        new connection until `closed_until` is set: an outage the client cannot resume
        through at once."""
        self._gateway.drop(shard, closed_until)

    # Driving the bot

    def user_says(
        self,
        channel_id: int,
        author: dict[str, Any] | int,
        content: str,
        *,
        mentions_bot: bool = False,
        reply_to: int | None = None,
        reply_ping: bool = True,
        attachments: list[dict[str, Any]] | None = None,
    ) -> int:
        """A user posts a message (MESSAGE_CREATE); returns its id.

        `mentions_bot` prefixes `<@bot>`; `reply_to` makes it a reply, pinging the replied-to
        author unless `reply_ping` is False; `attachments` come from `add_attachment`.
        """
        with self._lock:
            world = self._world
            user_id = int(world.user(author)["id"])
            channel = world.channels.get(int(channel_id))
            if channel is None:
                raise ValueError(f"the fake has no channel {channel_id}")
            if channel.guild_id is None and channel.recipient_id != user_id:
                raise ValueError(f"user {user_id} cannot write in DM channel {channel_id}")
            if mentions_bot:
                content = f"<@{BOT_ID}> {content}"
            reference: dict[str, str] | None = None
            pinged: tuple[int, ...] = ()
            if reply_to is not None:
                target = world.message(channel.id, reply_to)
                reference = {"message_id": str(reply_to), "channel_id": str(channel.id)}
                if reply_ping and target.author_id != user_id:
                    pinged = (target.author_id,)
            message = world.post(
                channel.id,
                user_id,
                content,
                extra_mentions=pinged,
                attachments=list(attachments or []),
                message_reference=reference,
            )
            return message.id

    def delete_user_message(self, channel_id: int, message_id: int) -> None:
        with self._lock:
            self._world.delete(self._world.message(channel_id, message_id))

    def bulk_delete(self, channel_id: int, message_ids: list[int]) -> None:
        """A moderator deletes several messages at once (MESSAGE_DELETE_BULK)."""
        with self._lock:
            self._world.bulk_delete(channel_id, message_ids)

    def add_attachment(
        self, filename: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> dict[str, Any]:
        """Store a file the fake serves; pass the returned dict to `user_says(attachments=)`."""
        with self._lock:
            return self._world.add_file(filename, data, content_type)

    def attachment_data(self, attachment: dict[str, Any]) -> bytes:
        """The bytes of an attachment (e.g. one the bot uploaded)."""
        with self._lock:
            return self._world.files[int(attachment["id"])].data

    def create_thread(
        self,
        parent_id: int,
        name: str,
        *,
        owner: dict[str, Any] | int | None = None,
        private: bool = False,
        from_message: int | None = None,
    ) -> int:
        """A user opens a thread (THREAD_CREATE); returns the thread's id. `from_message`
        (a message in the parent) starts a public thread from it, as Discord does: the thread
        takes the message's id and begins with a thread starter message pointing to it."""
        with self._lock:
            owner_id = int(self._world.user(owner or MEMBER_ID)["id"])
            if from_message is None:
                kind = PRIVATE_THREAD if private else PUBLIC_THREAD
                return self._world.create_thread(parent_id, name, owner_id, thread_type=kind).id
            self._world.message(parent_id, from_message)
            thread = self._world.create_thread(parent_id, name, owner_id, thread_id=from_message)
            self._world.start_thread_message(thread, owner_id)
            return thread.id

    def rename_thread(
        self, thread_id: int, name: str, *, by: dict[str, Any] | int | None = None
    ) -> None:
        """A person (the thread's owner, or a member with Manage Threads; by default the
        admin) renames a thread (THREAD_UPDATE)."""
        with self._lock:
            user_id = int(self._world.user(by or ADMIN_ID)["id"])
            self._world.rename_thread(self._world.channel(thread_id), name, user_id)

    def thread_names(self, thread_id: int) -> list[str]:
        """Every name the thread had, the first as opened, the last current."""
        with self._lock:
            return list(self._world.channel(thread_id).names)

    def refuse_next(
        self, method: str, path: str, status: int, code: int, message: str = "refused"
    ) -> None:
        """The next `method` request to `path` (under /api/v10, e.g. `/channels/123`) is
        answered with this error instead, as Discord answers one it refuses (403 Missing
        Permissions, 404 Unknown Channel, a 429 from its edge without a `Via` header)."""
        with self._lock:
            error = DiscordError(status, code, message)
            self._rest.records.refuse_next.append((method, f"{API}{path}", error))

    def set_permission_overwrite(
        self, channel_id: int, target: dict[str, Any] | int, *, allow: int = 0, deny: int = 0
    ) -> None:
        """An admin sets a channel's permissions for a role (a role id) or a member (a user),
        replacing any earlier overwrite for it (CHANNEL_UPDATE). Bits are `Perm`'s. The fake
        checks them where the bot opens threads, answering 403 Missing Permissions (50013) as
        Discord does; it does not check them for posting."""
        with self._lock:
            target_id = target if isinstance(target, int) else int(target["id"])
            if target_id not in self._world.roles:
                self._world.user(target_id)
            self._world.set_overwrite(int(channel_id), target_id, allow=allow, deny=deny)

    def dm_channel(self, user: dict[str, Any] | int) -> int:
        """The id of the DM channel between the bot and `user` (created on first use)."""
        with self._lock:
            return self._world.dm_channel(int(self._world.user(user)["id"])).id

    def invoke(
        self,
        command_name: str,
        options: dict[str, Any] | None = None,
        *,
        user: dict[str, Any] | int,
        channel_id: int,
        subcommand: str | None = None,
    ) -> int:
        """`user` runs a slash command (INTERACTION_CREATE); returns the interaction id.

        Raises CommandRefused, sending nothing, where Discord would refuse: a command the bot
        never registered, a member lacking its `default_member_permissions`, a guild-only
        command in a DM, a missing required option. `subcommand` is "sub" or "group sub".
        Option values: plain values, user/role/channel dicts or ids, attachment dicts.
        """
        with self._lock:
            user_id = int(self._world.user(user)["id"])
            payload = self._interactions.create(
                APPLICATION_COMMAND, command_name, options or {}, user_id, channel_id, subcommand
            )
            self._gateway.dispatch_locked("INTERACTION_CREATE", payload)
        return int(payload["id"])

    def submit_modal(self, opened_by: int, values: dict[str, str]) -> int:
        """The user submits the modal the bot answered interaction `opened_by` with
        (INTERACTION_CREATE of type MODAL_SUBMIT); returns the new interaction's id.
        `values` maps text inputs' `custom_id` to what the user typed; Discord's client
        refuses (CommandRefused) a value outside an input's limits."""
        with self._lock:
            payload = self._interactions.create_modal_submit(opened_by, values)
            self._gateway.dispatch_locked("INTERACTION_CREATE", payload)
        return int(payload["id"])

    def modal(self, interaction_id: int) -> dict[str, Any] | None:
        """The modal (callback `data`) the bot answered an interaction with, if any."""
        with self._lock:
            state = self._interactions.by_id.get(interaction_id)
            return None if state is None or state.modal is None else dict(state.modal)

    async def autocomplete(
        self,
        command_name: str,
        option_name: str,
        value: str,
        user: dict[str, Any] | int,
        channel_id: int,
        *,
        options: dict[str, Any] | None = None,
        subcommand: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - see `wait_for`
    ) -> list[dict[str, Any]]:
        """`user` types `value` into an autocomplete option; returns the choices the bot sent."""
        with self._lock:
            user_id = int(self._world.user(user)["id"])
            given = (options or {}) | {option_name: value}
            payload = self._interactions.create(
                AUTOCOMPLETE, command_name, given, user_id, channel_id, subcommand, option_name
            )
            self._gateway.dispatch_locked("INTERACTION_CREATE", payload)
        reply = await self.wait_for(
            lambda: self._reply_if(int(payload["id"]), lambda r: r.choices is not None),
            timeout,
            what=f"autocomplete choices for /{command_name} {option_name}={value!r}",
        )
        return reply.choices or []

    # Reading what happened

    def messages_in(self, channel_id: int, *, include_deleted: bool = False) -> list[Message]:
        """Every message in the channel (users' and the bot's), oldest first, as copies."""
        with self._lock:
            found = self._world.channel_messages(channel_id, include_deleted=include_deleted)
            return copy.deepcopy(found)

    def bot_messages(self, channel_id: int) -> list[Message]:
        return [m for m in self.messages_in(channel_id) if m.author_id == BOT_ID]

    def message(self, message_id: int) -> Message:
        with self._lock:
            return copy.deepcopy(self._world.messages[message_id])

    def interaction_reply(self, interaction_id: int) -> InteractionReply:
        """What the interaction's user sees now (no waiting)."""
        with self._lock:
            return self._interactions.reply(interaction_id)

    def commands(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        """Commands the bot registered globally (or for `guild_id`), as Discord stored them."""
        with self._lock:
            return copy.deepcopy(self._commands.listed(guild_id))

    @property
    def identify_payload(self) -> dict[str, Any] | None:
        """The last IDENTIFY's data (token, intents, properties...), None before any."""
        with self._lock:
            return copy.deepcopy(self._gateway.identify_payload)

    @property
    def session_shards(self) -> list[tuple[int, int] | None]:
        """The shard (`(shard_id, num_shards)`, None: unsharded) of each gateway session,
        connected or waiting to resume, in the order they identified."""
        with self._lock:
            return [s.shard for s in self._gateway.sessions.values()]

    def delivered(self, shard: tuple[int, int] | None) -> list[tuple[str, dict[str, Any]]]:
        """The events sent on the sessions of `shard` (None: unsharded ones), in order."""
        with self._lock:
            sessions = [s for s in self._gateway.sessions.values() if s.shard == shard]
            return copy.deepcopy([event for s in sessions for event in s.delivered])

    @property
    def connected_sessions(self) -> int:
        """How many gateway sessions are connected now (one per running bot process)."""
        with self._lock:
            return sum(1 for s in self._gateway.sessions.values() if s.queue is not None)

    @property
    def refused_connections(self) -> int:
        """Gateway connections refused while `drop_shard`'s outage lasted."""
        with self._lock:
            return self._gateway.refused_connections

    @property
    def resumes(self) -> int:
        """How many times a client resumed a session."""
        with self._lock:
            return self._gateway.resumes

    @property
    def dispatched(self) -> list[tuple[str, dict[str, Any]]]:
        """Every gateway event the fake dispatched, in order, as (name, data)."""
        with self._lock:
            return copy.deepcopy(self._gateway.dispatched)

    @property
    def crashes(self) -> list[str]:
        """Tracebacks of requests the fake itself failed on (answered 400, never retried)."""
        with self._lock:
            return list(self._rest.records.crashes)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._rest.records.requests)

    def history_reads(self, channel_id: int | None = None) -> list[RecordedRequest]:
        """The requests for a channel's messages (`GET /channels/{id}/messages`), in order."""
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and r.path.endswith("/messages")
            and (channel_id is None or r.path.endswith(f"/channels/{channel_id}/messages"))
        ]

    @property
    def refused(self) -> list[Refusal]:
        with self._lock:
            return list(self._rest.records.refused)

    @property
    def unhandled(self) -> list[str]:
        with self._lock:
            return list(self._rest.records.unhandled)

    @property
    def typing_calls(self) -> list[int]:
        with self._lock:
            return list(self._rest.records.typing_calls)

    @property
    def rate_limited(self) -> list[str]:
        with self._lock:
            return list(self._rest.records.rate_limited)

    @property
    def strict_edit_rate(self) -> bool:
        """When True, a 6th edit of one message within 5 s is answered 429, as Discord does."""
        return self._rest.strict_edit_rate

    @strict_edit_rate.setter
    def strict_edit_rate(self, value: bool) -> None:
        self._rest.strict_edit_rate = value

    @property
    def attachment_size_limit(self) -> int:
        """The most bytes a file may have: announced in each interaction and enforced on
        uploads (Discord's default for a server without boosts: 10 MB)."""
        with self._lock:
            return self._interactions.attachment_size_limit

    @attachment_size_limit.setter
    def attachment_size_limit(self, size: int) -> None:
        with self._lock:
            self._interactions.attachment_size_limit = size

    @property
    def interaction_ack_deadline(self) -> float:
        """Seconds the bot has to answer an interaction (Discord: 3) before 10062."""
        return self._interactions.ack_deadline

    @interaction_ack_deadline.setter
    def interaction_ack_deadline(self, seconds: float) -> None:
        self._interactions.ack_deadline = seconds

    # Waiting (from any event loop)

    async def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float = 30.0,  # noqa: ASYNC109 - the failure must show what was recorded
        *,
        what: str = "",
    ) -> T:
        """Poll `predicate` every 10 ms until it returns something truthy, and return that.

        On timeout, raises AssertionError showing everything the fake recorded, which a bare
        `asyncio.timeout` around the caller could not.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                wanted = what or getattr(predicate, "__name__", "a condition")
                raise AssertionError(f"timed out after {timeout} s waiting for {wanted}\n{self}")
            await asyncio.sleep(0.01)

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until a client identified and was sent its GUILD_CREATE."""

        def delivered() -> bool:
            with self._lock:
                return self._gateway.guild_creates_delivered > 0

        await self.wait_for(delivered, timeout, what="a client to identify")

    async def wait_bot_messages(
        self,
        channel_id: int,
        count: int = 1,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> list[Message]:
        """Until the bot has at least `count` messages in the channel; returns them all."""

        def enough() -> list[Message]:
            found = self.bot_messages(channel_id)
            return found if len(found) >= count else []

        return await self.wait_for(enough, timeout, what=f"{count} bot message(s) in {channel_id}")

    async def wait_interaction_reply(
        self,
        interaction_id: int,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> InteractionReply:
        """Until the interaction's user sees something (not just "thinking..."); returns it."""
        return await self.wait_for(
            lambda: self._reply_if(interaction_id, lambda r: r.visible),
            timeout,
            what=f"a visible reply to interaction {interaction_id}",
        )

    def _reply_if(
        self, interaction_id: int, condition: Callable[[InteractionReply], bool]
    ) -> InteractionReply | None:
        reply = self.interaction_reply(interaction_id)
        return reply if condition(reply) else None

    def __repr__(self) -> str:
        """A summary of everything recorded, for failure messages."""
        with self._lock:
            world, records = self._world, self._rest.records
            sessions = len(self._gateway.sessions)
            lines = [f"<FakeDiscord {self.http_base} sessions={sessions}>"]
            for message in world.messages.values():
                flags = " (ephemeral)" if message.ephemeral else ""
                flags += " (deleted)" if message.deleted else ""
                author = world.users[message.author_id]["username"]
                lines.append(f"  #{message.channel_id} {author}: {message.content[:100]!r}{flags}")
            for state in self._interactions.by_id.values():
                kinds = [r["type"] for r in state.responses]
                lines.append(f"  interaction {state.id} /{state.command}: responses {kinds}")
            for label, items in (
                ("unhandled", records.unhandled),
                ("refused", [f"{r.method} {r.path}: {r.errors}" for r in records.refused]),
                ("rate limited", records.rate_limited),
                ("fake crashed", [c.strip().splitlines()[-1] for c in records.crashes]),
            ):
                lines += [f"  {label}: {item}" for item in items]
            return "\n".join(lines)
