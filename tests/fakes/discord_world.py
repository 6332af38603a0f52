"""What the fake Discord knows: one guild (or two), its people and channels, DMs, messages,
files.

Every method runs with the fake's lock held. Changes a client would see (a new message, an
edit, a thread) go through `dispatch`, which the gateway turns into events for connected
bots, the way Discord echoes even a bot's own posts back to it.
"""

from __future__ import annotations

import copy
import datetime
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000

# Fixed ids (snowflakes from 2022), so tests and failure messages are stable across runs.
BOT_ID = 1_000_000_000_000_000_001
GUILD_ID = 1_000_000_000_000_000_100
ADMIN_ID = 1_000_000_000_000_000_201
MEMBER_ID = 1_000_000_000_000_000_202
OTHER_MEMBER_ID = 1_000_000_000_000_000_203
OTHER_BOT_ID = 1_000_000_000_000_000_204
ADMIN_ROLE_ID = 1_000_000_000_000_000_301
BOT_ROLE_ID = 1_000_000_000_000_000_302
GENERAL_ID = 1_000_000_000_000_000_401
RANDOM_ID = 1_000_000_000_000_000_402
# A second guild, only where a test asks for it (sharding): on shard 0 of 2, where GUILD_ID
# is on shard 1 (a guild's shard is `(guild_id >> 22) % shard_count`).
OTHER_GUILD_ID = 1_000_000_000_004_200_100
OTHER_CHANNEL_ID = 1_000_000_000_004_200_401

TEXT_CHANNEL, DM_CHANNEL, PUBLIC_THREAD, PRIVATE_THREAD = 0, 1, 11, 12
THREAD_TYPES = (10, PUBLIC_THREAD, PRIVATE_THREAD)

ROLE, MEMBER = 0, 1  # the kinds of permission overwrite

DEFAULT_MESSAGE, REPLY_MESSAGE, CHAT_INPUT_COMMAND_MESSAGE = 0, 19, 20
THREAD_STARTER_MESSAGE = 21
EPHEMERAL, LOADING = 1 << 6, 1 << 7


class Perm:
    """Permission bits the fake hands out (Discord's values)."""

    ADMINISTRATOR = 1 << 3
    MANAGE_GUILD = 1 << 5
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    USE_EXTERNAL_EMOJIS = 1 << 18
    CHANGE_NICKNAME = 1 << 26
    USE_APPLICATION_COMMANDS = 1 << 31
    MANAGE_THREADS = 1 << 34
    CREATE_PUBLIC_THREADS = 1 << 35
    CREATE_PRIVATE_THREADS = 1 << 36
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 54) - 1  # what Discord reports for an administrator

    EVERYONE = (
        ADD_REACTIONS
        | VIEW_CHANNEL
        | SEND_MESSAGES
        | EMBED_LINKS
        | ATTACH_FILES
        | READ_MESSAGE_HISTORY
        | USE_EXTERNAL_EMOJIS
        | CHANGE_NICKNAME
        | USE_APPLICATION_COMMANDS
        | CREATE_PUBLIC_THREADS
        | SEND_MESSAGES_IN_THREADS
    )
    # The bot is deliberately not an administrator, so permission handling stays visible.
    BOT = EVERYONE | MANAGE_MESSAGES | MANAGE_THREADS | CREATE_PRIVATE_THREADS


class Intent:
    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15
    PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT
    """The ones an application must switch on in the Developer Portal before asking for them."""


class DiscordError(Exception):
    """An error Discord would answer with; the REST layer turns it into the JSON reply."""

    def __init__(
        self, status: int, code: int, message: str, errors: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def unknown_channel() -> DiscordError:
    return DiscordError(404, 10003, "Unknown Channel")


def unknown_message() -> DiscordError:
    return DiscordError(404, 10008, "Unknown Message")


def missing_permissions() -> DiscordError:
    return DiscordError(403, 50013, "Missing Permissions")


def iso_time(snowflake: int) -> str:
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).isoformat()


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).isoformat()


class Snowflakes:
    """Time-based, strictly increasing ids, so ordering and `created_at` behave as in Discord."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        now_ms = int(datetime.datetime.now(tz=datetime.UTC).timestamp() * 1000)
        with self._lock:
            self._last = max((now_ms - DISCORD_EPOCH_MS) << 22, self._last + 1)
            return self._last


@dataclass
class Channel:
    id: int
    type: int
    name: str | None
    guild_id: int | None
    position: int = 0
    parent_id: int | None = None
    owner_id: int | None = None
    recipient_id: int | None = None
    last_message_id: int | None = None
    message_count: int = 0
    overwrites: list[dict[str, Any]] = field(default_factory=list)  # as Discord sends them
    names: list[str] = field(default_factory=list)  # a thread's every name, the last current


@dataclass
class Message:
    """One message as the fake stored it: what was sent, and every version after edits."""

    id: int
    channel_id: int
    author_id: int
    content: str
    history: list[str]  # every version of the content, the first as posted, the last current
    type: int = DEFAULT_MESSAGE
    flags: int = 0
    embeds: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    mentions: list[int] = field(default_factory=list)
    allowed_mentions: dict[str, Any] | None = None  # as the bot sent it
    message_reference: dict[str, Any] | None = None  # as sent
    interaction_id: int | None = None
    interaction_metadata: dict[str, Any] | None = None
    webhook_id: int | None = None
    edited_at: str | None = None
    deleted: bool = False

    @property
    def original_content(self) -> str:
        return self.history[0]

    @property
    def edited(self) -> bool:
        return self.edited_at is not None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def reply_to(self) -> int | None:
        if self.message_reference is None:
            return None
        return int(self.message_reference["message_id"])


@dataclass
class StoredFile:
    filename: str
    data: bytes
    content_type: str


_MENTION = re.compile(r"<@!?(\d+)>")


def _user(user_id: int, username: str, global_name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": username,
        "discriminator": "0",
        "global_name": global_name,
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


def _role(role_id: int, name: str, permissions: int, position: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": str(role_id),
        "name": name,
        "permissions": str(permissions),
        "position": position,
        "color": 0,
        "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
        "hoist": False,
        "managed": False,
        "mentionable": False,
        "icon": None,
        "unicode_emoji": None,
        "flags": 0,
        **extra,
    }


class World:
    def __init__(
        self,
        http_base: str,
        dispatch: Callable[[str, dict[str, Any]], None],
        *,
        second_guild: bool = False,
    ) -> None:
        self.http_base = http_base
        self.dispatch = dispatch
        self.ids = Snowflakes()
        self.bot_user = _user(BOT_ID, "fakebot", "Fake Bot", bot=True)
        self.users: dict[int, dict[str, Any]] = {
            BOT_ID: self.bot_user,
            ADMIN_ID: _user(ADMIN_ID, "alice", "Alice Admin"),
            MEMBER_ID: _user(MEMBER_ID, "bob", "Bob Member"),
            OTHER_MEMBER_ID: _user(OTHER_MEMBER_ID, "carol", "Carol Member"),
            # Another application's bot: it posts in the guild but is not a cached member.
            OTHER_BOT_ID: _user(OTHER_BOT_ID, "otherbot", "Other Bot", bot=True),
        }
        self.roles: dict[int, dict[str, Any]] = {
            GUILD_ID: _role(GUILD_ID, "@everyone", Perm.EVERYONE, 0),
            ADMIN_ROLE_ID: _role(ADMIN_ROLE_ID, "Admin", Perm.ADMINISTRATOR | Perm.MANAGE_GUILD, 2),
            BOT_ROLE_ID: _role(
                BOT_ROLE_ID, "fakebot", Perm.BOT, 1, managed=True, tags={"bot_id": str(BOT_ID)}
            ),
        }
        self.member_roles: dict[int, list[int]] = {
            BOT_ID: [BOT_ROLE_ID],
            ADMIN_ID: [ADMIN_ROLE_ID],
            MEMBER_ID: [],
            OTHER_MEMBER_ID: [],
        }
        self.joined_at = iso_time(GUILD_ID)
        self.channels: dict[int, Channel] = {
            GENERAL_ID: Channel(GENERAL_ID, TEXT_CHANNEL, "general", GUILD_ID, position=0),
            RANDOM_ID: Channel(RANDOM_ID, TEXT_CHANNEL, "random", GUILD_ID, position=1),
        }
        self.guild_ids = [GUILD_ID]
        if second_guild:  # the same people and roles, one channel
            self.guild_ids.append(OTHER_GUILD_ID)
            self.channels[OTHER_CHANNEL_ID] = Channel(
                OTHER_CHANNEL_ID, TEXT_CHANNEL, "elsewhere", OTHER_GUILD_ID, position=0
            )
        self.messages: dict[int, Message] = {}
        self.files: dict[int, StoredFile] = {}

    # People and permissions

    def user(self, user: dict[str, Any] | int | str) -> dict[str, Any]:
        user_id = int(user["id"]) if isinstance(user, dict) else int(user)
        try:
            return self.users[user_id]
        except KeyError:
            raise ValueError(f"the fake knows no user {user_id}") from None

    def permissions(self, user_id: int) -> int:
        """Guild-level permissions, as Discord computes them for `member.permissions`."""
        perms = int(self.roles[GUILD_ID]["permissions"])
        for role_id in self.member_roles.get(user_id, []):
            perms |= int(self.roles[role_id]["permissions"])
        return Perm.ALL if perms & Perm.ADMINISTRATOR else perms

    def channel_permissions(self, user_id: int, channel: Channel) -> int:
        """What the member may do in `channel` (a thread: in its parent): the guild-level
        permissions with the channel's overwrites applied in Discord's order, @everyone's,
        then the member's roles' together, then the member's own."""
        perms = self.permissions(user_id)
        if perms & Perm.ADMINISTRATOR:
            return perms
        if channel.parent_id is not None:
            channel = self.channels[channel.parent_id]
        roles = set(self.member_roles.get(user_id, []))
        layers = (
            [o for o in channel.overwrites if o["type"] == ROLE and int(o["id"]) == GUILD_ID],
            [o for o in channel.overwrites if o["type"] == ROLE and int(o["id"]) in roles],
            [o for o in channel.overwrites if o["type"] == MEMBER and int(o["id"]) == user_id],
        )
        for layer in layers:
            deny = allow = 0
            for overwrite in layer:
                deny |= int(overwrite["deny"])
                allow |= int(overwrite["allow"])
            perms = (perms & ~deny) | allow
        return perms

    def require(self, user_id: int, channel: Channel, needed: int) -> None:
        """Refuse, as Discord does, an action the member lacks a permission for here."""
        if self.channel_permissions(user_id, channel) & needed != needed:
            raise missing_permissions()

    def set_overwrite(self, channel_id: int, target_id: int, *, allow: int, deny: int) -> None:
        """Replace a role's (or, for any other id, a member's) overwrite on a guild channel,
        as an admin editing the channel's permissions does; connected bots get CHANNEL_UPDATE."""
        channel = self.channel(channel_id)
        if channel.guild_id is None or channel.type in THREAD_TYPES:
            raise DiscordError(400, 50024, "Cannot execute action on this channel type")
        kind = ROLE if target_id in self.roles else MEMBER
        channel.overwrites = [o for o in channel.overwrites if int(o["id"]) != target_id]
        channel.overwrites.append(
            {"id": str(target_id), "type": kind, "allow": str(allow), "deny": str(deny)}
        )
        self.dispatch("CHANNEL_UPDATE", self.channel_payload(channel))

    def member_payload(self, user_id: int, *, with_user: bool = True) -> dict[str, Any]:
        member: dict[str, Any] = {
            "roles": [str(r) for r in self.member_roles[user_id]],
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "nick": None,
            "avatar": None,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if with_user:
            member["user"] = self.users[user_id]
        return member

    # Guild and channels

    def guild_payload(self, guild_id: int = GUILD_ID) -> dict[str, Any]:
        """GUILD_CREATE's data: everything discord.py caches, members counted exactly. The
        second guild has the same people and roles (its @everyone role bears its own id)."""
        here = [c for c in self.channels.values() if c.guild_id == guild_id]
        guild_channels = [c for c in here if c.type == TEXT_CHANNEL]
        threads = [c for c in here if c.type in THREAD_TYPES]
        roles = [
            role | {"id": str(guild_id)} if int(role["id"]) == GUILD_ID else role
            for role in self.roles.values()
        ]
        return {
            "id": str(guild_id),
            "name": "Fake Guild" if guild_id == GUILD_ID else "Other Guild",
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(ADMIN_ID),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "system_channel_id": str(guild_channels[0].id),
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "preferred_locale": "en-US",
            "features": [],
            "description": None,
            "application_id": None,
            "joined_at": self.joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(self.member_roles),
            "roles": roles,
            "members": [self.member_payload(uid) for uid in self.member_roles],
            "channels": [self.channel_payload(c) for c in guild_channels],
            "threads": [self.channel_payload(c) for c in threads],
            "emojis": [],
            "stickers": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def channel(self, channel_id: int | str) -> Channel:
        try:
            return self.channels[int(channel_id)]
        except (KeyError, ValueError):
            raise unknown_channel() from None

    def channel_payload(self, channel: Channel) -> dict[str, Any]:
        last = str(channel.last_message_id) if channel.last_message_id else None
        if channel.type == DM_CHANNEL:
            assert channel.recipient_id is not None
            return {
                "id": str(channel.id),
                "type": DM_CHANNEL,
                "last_message_id": last,
                "flags": 0,
                "recipients": [self.users[channel.recipient_id]],
            }
        payload: dict[str, Any] = {
            "id": str(channel.id),
            "type": channel.type,
            "guild_id": str(channel.guild_id),
            "name": channel.name,
            "position": channel.position,
            "parent_id": str(channel.parent_id) if channel.parent_id else None,
            "last_message_id": last,
            "rate_limit_per_user": 0,
            "flags": 0,
        }
        if channel.type in THREAD_TYPES:
            payload |= {
                "owner_id": str(channel.owner_id),
                "message_count": channel.message_count,
                "total_message_sent": channel.message_count,
                "member_count": 1,
                "thread_metadata": {
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": iso_time(channel.id),
                    "locked": False,
                    "create_timestamp": iso_time(channel.id),
                },
            }
        else:
            overwrites = copy.deepcopy(channel.overwrites)
            payload |= {"topic": None, "nsfw": False, "permission_overwrites": overwrites}
        return payload

    def create_thread(
        self,
        parent_id: int,
        name: str,
        owner_id: int,
        *,
        thread_type: int = PUBLIC_THREAD,
        thread_id: int | None = None,
    ) -> Channel:
        parent = self.channel(parent_id)
        if parent.type != TEXT_CHANNEL:
            raise DiscordError(400, 50024, "Cannot execute action on this channel type")
        thread_id = thread_id or self.ids.next()
        if thread_id in self.channels:
            raise DiscordError(400, 160004, "A thread has already been created for this message")
        thread = Channel(
            thread_id,
            thread_type,
            name,
            parent.guild_id,
            parent_id=parent.id,
            owner_id=owner_id,
            names=[name],
        )
        self.channels[thread_id] = thread
        self.dispatch("THREAD_CREATE", self.channel_payload(thread) | {"newly_created": True})
        return thread

    def rename_thread(self, thread: Channel, name: str, by: int) -> Channel:
        """A thread's new name, as its owner or a member with Manage Threads gives it in
        Discord (other members are refused); connected bots get THREAD_UPDATE."""
        if thread.type not in THREAD_TYPES:
            raise DiscordError(400, 50024, "Cannot execute action on this channel type")
        if thread.owner_id != by:
            self.require(by, thread, Perm.MANAGE_THREADS)
        thread.name = name
        thread.names.append(name)
        self.dispatch("THREAD_UPDATE", self.channel_payload(thread))
        return thread

    def start_thread_message(self, thread: Channel, author_id: int) -> Message:
        """A thread made from a message begins with a THREAD_STARTER_MESSAGE (type 21): no
        content of its own, a reference to the message in the parent channel, which reads of
        the thread carry as `referenced_message`."""
        assert thread.parent_id is not None
        reference = {"message_id": str(thread.id), "channel_id": str(thread.parent_id)}
        msg = Message(
            self.ids.next(),
            thread.id,
            author_id,
            "",
            [""],
            type=THREAD_STARTER_MESSAGE,
            message_reference=reference,
        )
        self.messages[msg.id] = msg
        self.dispatch("MESSAGE_CREATE", self.message_payload(msg))
        return msg

    def dm_channel(self, user_id: int) -> Channel:
        for channel in self.channels.values():
            if channel.type == DM_CHANNEL and channel.recipient_id == user_id:
                return channel
        self.user(user_id)
        channel = Channel(self.ids.next(), DM_CHANNEL, None, None, recipient_id=user_id)
        self.channels[channel.id] = channel
        return channel

    # Files

    def add_file(self, filename: str, data: bytes, content_type: str) -> dict[str, Any]:
        file_id = self.ids.next()
        self.files[file_id] = StoredFile(filename, data, content_type)
        url = f"{self.http_base}/attachments/{file_id}/{filename}"
        return {
            "id": str(file_id),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }

    # Messages

    def message(self, channel_id: int | str, message_id: int | str) -> Message:
        self.channel(channel_id)
        msg = self.messages.get(int(message_id))
        if msg is None or msg.deleted or msg.channel_id != int(channel_id):
            raise unknown_message()
        return msg

    def channel_messages(self, channel_id: int, *, include_deleted: bool = False) -> list[Message]:
        """What a user would see in the channel, oldest first (never ephemeral messages)."""
        return [
            m
            for m in self.messages.values()
            if m.channel_id == channel_id and not m.ephemeral and (include_deleted or not m.deleted)
        ]

    def post(
        self,
        channel_id: int,
        author_id: int,
        content: str,
        *,
        extra_mentions: tuple[int, ...] = (),
        **fields: Any,
    ) -> Message:
        """Store a new message and, unless it is ephemeral, tell the gateway about it."""
        channel = self.channel(channel_id)
        mentions = [int(m) for m in _MENTION.findall(content) if int(m) in self.users]
        mentions += [m for m in extra_mentions if m not in mentions]
        if fields.get("message_reference") and "type" not in fields:
            fields["type"] = REPLY_MESSAGE
        msg = Message(
            self.ids.next(), channel.id, author_id, content, [content], mentions=mentions, **fields
        )
        self.messages[msg.id] = msg
        if not msg.ephemeral:
            channel.last_message_id = msg.id
            channel.message_count += 1
            self.dispatch("MESSAGE_CREATE", self.message_payload(msg))
        return msg

    def edit(self, msg: Message, changes: dict[str, Any]) -> Message:
        if "content" in changes:
            msg.content = changes["content"] or ""
            msg.history.append(msg.content)
        for key in ("embeds", "attachments"):
            if key in changes:
                setattr(msg, key, changes[key] or [])
        if changes.get("flags") is not None:
            # An edit can suppress embeds but can never make a message (un)ephemeral.
            msg.flags = (msg.flags & EPHEMERAL) | (int(changes["flags"]) & ~EPHEMERAL)
        if "allowed_mentions" in changes:
            msg.allowed_mentions = changes["allowed_mentions"]
        msg.flags &= ~LOADING
        msg.edited_at = now_iso()
        if not msg.ephemeral:
            self.dispatch("MESSAGE_UPDATE", self.message_payload(msg))
        return msg

    def delete(self, msg: Message) -> None:
        msg.deleted = True
        if not msg.ephemeral:
            data = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
            guild_id = self.channels[msg.channel_id].guild_id
            if guild_id:
                data["guild_id"] = str(guild_id)
            self.dispatch("MESSAGE_DELETE", data)

    def bulk_delete(self, channel_id: int, message_ids: list[int]) -> None:
        """What a moderator's bulk delete (a purge) sends: one MESSAGE_DELETE_BULK."""
        channel = self.channel(channel_id)
        for message_id in message_ids:
            self.message(channel.id, message_id).deleted = True
        data = {"ids": [str(i) for i in message_ids], "channel_id": str(channel.id)}
        if channel.guild_id:
            data["guild_id"] = str(channel.guild_id)
        self.dispatch("MESSAGE_DELETE_BULK", data)

    def message_payload(self, msg: Message, *, nested: bool = True) -> dict[str, Any]:
        """A full message object, as MESSAGE_CREATE, REST answers and replies carry it."""
        channel = self.channels[msg.channel_id]
        in_guild = channel.guild_id is not None
        payload: dict[str, Any] = {
            "id": str(msg.id),
            "channel_id": str(msg.channel_id),
            "author": self.users[msg.author_id],
            "content": msg.content,
            "timestamp": iso_time(msg.id),
            "edited_timestamp": msg.edited_at,
            "tts": False,
            "mention_everyone": False,
            "mentions": [self._mention(uid, in_guild) for uid in msg.mentions],
            "mention_roles": [],
            "attachments": copy.deepcopy(msg.attachments),
            "embeds": copy.deepcopy(msg.embeds),
            "components": [],
            "pinned": False,
            "type": msg.type,
            "flags": msg.flags,
        }
        if in_guild:
            payload["guild_id"] = str(channel.guild_id)
            if msg.webhook_id is None and msg.author_id in self.member_roles:
                payload["member"] = self.member_payload(msg.author_id, with_user=False)
        if msg.webhook_id is not None:
            payload["webhook_id"] = payload["application_id"] = str(msg.webhook_id)
        if msg.interaction_metadata is not None:
            payload["interaction_metadata"] = msg.interaction_metadata
        if msg.message_reference is not None:
            ref = msg.message_reference
            ref_channel = int(ref.get("channel_id") or msg.channel_id)
            payload["message_reference"] = {
                "type": ref.get("type") or 0,
                "message_id": str(ref["message_id"]),
                "channel_id": str(ref_channel),
            }
            if in_guild:
                payload["message_reference"]["guild_id"] = str(channel.guild_id)
            if nested:
                target = self.messages.get(int(ref["message_id"]))
                alive = target is not None and not target.deleted
                payload["referenced_message"] = (
                    self.message_payload(target, nested=False) if alive and target else None
                )
        return payload

    def _mention(self, user_id: int, in_guild: bool) -> dict[str, Any]:
        mention = dict(self.users[user_id])
        if in_guild and user_id in self.member_roles:
            mention["member"] = self.member_payload(user_id, with_user=False)
        return mention
