"""Messages in, answers out: decides whether a Discord message is for the bot, turns it into
an OpenAI-format user message (speaker, readable mentions, attachments) and streams the
engine's answer back. Everything else about a turn happens in the core."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import re
import time
import weakref
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aiohttp
import discord
from discord.ext import commands

from bot.commands import ReplyMode
from bot.context import ChannelContext, speaker_label
from bot.discord_bot.render import LiveReply
from bot.discord_bot.scopes import channel_of, guild_of, parent_of, scope_for, server_for
from bot.engine import (
    HAND_BACK_SECONDS,
    NOT_KEPT_NOTE,
    WITHOUT_HISTORY_NOTE,
    AnsweredElsewhere,
    Backfill,
    ChannelContextSource,
    ShuttingDown,
)
from bot.errors import BotError, CorruptSession, DamagedState, StoreUnavailable
from bot.metrics import TurnPart
from bot.store.base import AlreadyClaimed, Message, message_size
from bot.usage import Account, OverLimit

if TYPE_CHECKING:
    from bot.discord_bot.client import ChatBot

log = logging.getLogger(__name__)

TEXT_ATTACHMENT_MAX_BYTES = 50_000
"""Text files up to this size are inlined into the conversation; larger ones get a note."""
TEXT_SUFFIXES = frozenset(
    [
        ".txt",
        ".md",
        ".py",
        ".js",
        ".ts",
        ".json",
        ".yaml",
        ".yml",
        ".toml",
        ".csv",
        ".log",
        ".html",
        ".css",
        ".c",
        ".h",
        ".cpp",
        ".rs",
        ".go",
        ".java",
        ".sh",
        ".sql",
        ".xml",
        ".ini",
        ".cfg",
    ]
)
REPLY_MODE_CACHE_SECONDS = 30.0
"""How long this process trusts its copy of a channel's reply mode and channel-context switch
(another process may change them); `/mode` and `/context` here update it at once."""
CONTEXT_TYPES = frozenset(
    [
        discord.MessageType.default,
        discord.MessageType.reply,
        discord.MessageType.chat_input_command,
        discord.MessageType.context_menu_command,
    ]
)
"""Messages people (and other bots) wrote; joins, pins and the like are left out."""
STARTER_LABEL = "(the message this thread was started from) "
REPLIED_LABEL = "(the message being replied to) "
SHORTENED_NOTE = (
    "\n\n-# Earlier messages were left out: the conversation is too long for the model."
)
UNEXPECTED = "Something went wrong on the bot's side; the conversation is unchanged."
INTERRUPTED = "The bot was stopped before it finished this answer; it answers again once back."

T = TypeVar("T")

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")


def readable_text(message: discord.Message, bot_id: int) -> str:
    """The message with mentions as names (`@Ada`, `@Moderators`, `#general`) and the bot's
    own mention removed, so the model reads what people see."""
    users = {u.id: u.display_name for u in message.mentions}
    roles = {r.id: r.name for r in message.role_mentions}
    guild = message.guild

    def user(match: re.Match[str]) -> str:
        uid = int(match[1])
        return "" if uid == bot_id else f"@{users.get(uid, 'unknown-user')}"

    def channel(match: re.Match[str]) -> str:
        found = guild.get_channel_or_thread(int(match[1])) if guild else None
        return f"#{found.name if found else 'unknown-channel'}"

    text = _USER_MENTION.sub(user, message.content)
    text = _ROLE_MENTION.sub(lambda m: f"@{roles.get(int(m[1]), 'unknown-role')}", text)
    return _CHANNEL_MENTION.sub(channel, text).strip()


def _is_text(attachment: discord.Attachment) -> bool:
    kind = (attachment.content_type or "").split(";")[0].strip()
    suffix = PurePosixPath(attachment.filename).suffix.lower()
    return kind.startswith("text/") or kind == "application/json" or suffix in TEXT_SUFFIXES


async def user_message(message: discord.Message, bot_id: int) -> Message:
    """What is stored and sent: who spoke (name and ID, since channels have many speakers),
    the text, text files inlined, images as image parts, and a note for anything else."""
    author = message.author
    bot = ", a bot" if author.bot else ""
    label = speaker_label(author.display_name, f"{author.id}{bot}")
    lines = [f"{label}: {readable_text(message, bot_id)}"]
    images: list[dict[str, Any]] = []
    for attachment in message.attachments:
        kind = (attachment.content_type or "").split(";")[0].strip()
        if kind.startswith("image/"):
            images.append({"type": "image_url", "image_url": {"url": attachment.url}})
        elif _is_text(attachment) and attachment.size <= TEXT_ATTACHMENT_MAX_BYTES:
            try:
                body = (await attachment.read()).decode("utf-8", errors="replace")
            except (discord.HTTPException, aiohttp.ClientError) as error:
                log.warning("could not download %s: %s", attachment.filename, error)
                lines.append(f"[file {attachment.filename} could not be downloaded]")
                continue
            lines.append(f"[file {attachment.filename}]\n```\n{body}\n```")
        elif _is_text(attachment):
            lines.append(
                f"[file {attachment.filename} was not read: text files are read up to "
                f"{TEXT_ATTACHMENT_MAX_BYTES // 1000} KB]"
            )
        else:
            lines.append(
                f"[attachment {attachment.filename} ({kind or 'unknown type'}) was not read: "
                "the bot reads images and text files only]"
            )
    text = "\n".join(lines)
    if images:
        return {"role": "user", "content": [{"type": "text", "text": text}, *images]}
    return {"role": "user", "content": text}


def account_of(message: discord.Message) -> Account:
    """Who a message's turn is charged to; members with Manage Server count as admins (in a
    DM nobody does: the limits hold there too)."""
    author = message.author
    admin = isinstance(author, discord.Member) and author.guild_permissions.manage_guild
    guild_id = message.guild.id if message.guild else None
    return Account(server_for(guild_id, author.id), str(author.id), admin)


async def refuse(message: discord.Message, over: OverLimit) -> None:
    """Tell a member over a limit, once a minute at most (`over.notify`): a reply to their
    message that pings nobody, not even them."""
    log.info("message %s not answered: its author is over a usage limit", message.id)
    if not over.notify:
        return
    try:
        await message.channel.send(
            str(over),
            reference=message.to_reference(fail_if_not_exists=False),
            mention_author=False,
            allowed_mentions=discord.AllowedMentions.none(),
        )
    except (discord.HTTPException, aiohttp.ClientError) as error:
        log.warning("could not tell a member they are over a limit: %s", error)


def _labelled(item: Message, label: str) -> Message:
    content = item.get("content")
    if isinstance(content, str):
        return {**item, "content": label + content}
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = {**content[0], "text": label + str(content[0].get("text", ""))}
        return {**item, "content": [first, *content[1:]]}
    return item


def _thread_starter(
    channel: discord.abc.Messageable, page: list[discord.Message]
) -> discord.Message | None:
    """The message a thread was started from, without a request: a thread made from a
    message begins with a thread starter message whose reference Discord resolves (when the
    page reaches back that far), and discord.py may have the message itself from the parent
    channel. A forum post's first message is the thread's own, found in the page."""
    if not isinstance(channel, discord.Thread):
        return None
    for m in page:
        resolved = m.reference.resolved if m.reference else None
        if m.type is discord.MessageType.thread_starter_message and resolved is not None:
            return resolved if isinstance(resolved, discord.Message) else None  # deleted
    return channel.starter_message


class _PerPlace(Generic[T]):
    """A per-place setting another process may change, trusted for a short while."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[T, float]] = {}

    def get(self, scope: str) -> T | None:
        cached = self._known.get(scope)
        return cached[0] if cached and cached[1] > time.monotonic() else None

    def forget(self, scope: str) -> None:
        self._known.pop(scope, None)

    def remember(self, scope: str, value: T) -> None:
        if len(self._known) > 10_000:
            self._known.clear()
        self._known[scope] = (value, time.monotonic() + REPLY_MODE_CACHE_SECONDS)


class Conversation(commands.Cog):
    def __init__(self, bot: ChatBot, channel_context_messages: int) -> None:
        self.bot = bot
        self._context_messages = channel_context_messages
        self._modes = _PerPlace[ReplyMode]()
        self._context_on = _PerPlace[bool]()
        self._in_arrival_order: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _known_mode(self, scope: str) -> ReplyMode | None:
        return self._modes.get(scope)

    async def reply_mode(self, scope: str) -> ReplyMode:
        known = self._known_mode(scope)
        if known is not None:
            return known
        mode = await self.bot.session_commands.reply_mode(scope)
        self.remember_mode(scope, mode)
        return mode

    def remember_mode(self, scope: str, mode: ReplyMode) -> None:
        self._modes.remember(scope, mode)

    def remember_channel_context(self, scope: str, on: bool) -> None:
        self._context_on.remember(scope, on)

    async def _channel_context_on(self, channel: discord.abc.Messageable) -> bool:
        scope = scope_for(channel.id)  # type: ignore[attr-defined]
        known = self._context_on.get(scope)
        if known is None:
            parent = parent_of(channel)
            known = await self.bot.session_commands.channel_context(
                scope, parent.scope if parent else None
            )
            self._context_on.remember(scope, known)
        return known

    def _around(self, message: discord.Message) -> ChannelContextSource | None:
        if not self._context_messages:
            return None
        return functools.partial(self._channel_context, message)

    async def _channel_context(
        self, message: discord.Message, turn_scope: str, answered: int | None
    ) -> ChannelContext | None:
        """What was said in the message's channel since the bot's last answer there, read in
        one request (the page of messages just before it), with the thread's first message
        when the bot never answered in that thread, and the message replied to (which the
        event carries). Nothing when an admin switched it off; a read Discord refuses is
        logged and the turn goes on without it. `answered` is the last answer in the turn's
        place, which came with the turn: the channel's own, unless the answer goes to a
        thread the bot opened (then the channel's is read)."""
        me = self.bot.user
        assert me is not None
        channel = message.channel
        scope = scope_for(channel.id)
        try:
            if not await self._channel_context_on(channel):
                return None
            last = answered if scope == turn_scope else await self.bot.engine.last_answered(scope)
        except StoreUnavailable:
            log.warning("no channel context for %s: storage unavailable", message.id)
            return None
        try:
            page = [m async for m in channel.history(limit=self._context_messages, before=message)]
        except (discord.HTTPException, aiohttp.ClientError) as error:
            log.warning("could not read the messages before %s in %s: %s", message.id, scope, error)
            page = []
        first_time = last is None
        if last is None:  # never answered here (or forgotten): since its own last message
            last = next((m.id for m in page if m.author.id == me.id), 0)
        since = [
            m
            for m in reversed(page)
            if m.id > last and m.author.id != me.id and m.type in CONTEXT_TYPES
        ]
        shown = {m.id for m in since}
        earlier: list[Message] = []
        starter = _thread_starter(channel, page) if first_time else None
        if starter is not None and starter.id not in shown:
            earlier.append(_labelled(await user_message(starter, me.id), STARTER_LABEL))
            shown.add(starter.id)
        replied = message.reference.resolved if message.reference else None
        if (
            isinstance(replied, discord.Message)
            and replied.author.id != me.id  # the bot's own words are in the session already
            and replied.id not in shown
        ):
            earlier.append(_labelled(await user_message(replied, me.id), REPLIED_LABEL))
        room = self.bot.engine.channel_context_bytes - sum(map(message_size, earlier))
        recent: list[Message] = []
        for m in reversed(since):  # the newest first, reading files only while they may fit
            item = await user_message(m, me.id)
            room -= message_size(item)
            if room < 0:
                break
            recent.append(item)
        recent.reverse()
        return ChannelContext(recent=recent, earlier=earlier)

    def forget_mode(self, scope: str) -> None:
        """The place's stored mode (and channel-context switch) was deleted: read it (the
        default) again."""
        self._modes.forget(scope)
        self._context_on.forget(scope)

    def _addressed(self, message: discord.Message, me: discord.ClientUser) -> bool:
        if me in message.mentions:
            return True
        replied = message.reference.resolved if message.reference else None
        return isinstance(replied, discord.Message) and replied.author.id == me.id

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        ordinary = (discord.MessageType.default, discord.MessageType.reply)
        if me is None or message.author.bot or message.type not in ordinary:
            return
        if self.bot.engine.draining:
            return  # stopping: another process, or the next start, answers it
        channel = message.channel
        scope = scope_for(channel.id)
        always = message.guild is None or (
            isinstance(channel, discord.Thread) and channel.owner_id == me.id
        )
        addressed = self._addressed(message, me)
        if not (always or addressed) and self._known_mode(scope) is ReplyMode.MENTIONS:
            return  # most messages in a busy channel: decided without waiting
        async with contextlib.AsyncExitStack() as in_order:
            # Taken before any other await: this process handles a channel's messages in the
            # order they arrived, which keeps the turns (and the stored history) in that order.
            lock = self._in_arrival_order.setdefault(scope, asyncio.Lock())
            await in_order.enter_async_context(lock)
            await self._handle(message, scope, in_order, always=always, addressed=addressed)

    async def _handle(
        self,
        message: discord.Message,
        scope: str,
        in_order: contextlib.AsyncExitStack,
        *,
        always: bool,
        addressed: bool,
    ) -> None:
        """Answer `message` if it is for the bot. Closing `in_order` lets the channel's next
        message go ahead (an answer in a thread of its own needs no place in its order)."""
        me = self.bot.user
        assert me is not None
        channel = message.channel
        if always:
            await self.answer(message, channel)
            return
        try:
            mode = await self.reply_mode(scope)
        except StoreUnavailable as error:
            if addressed:
                await LiveReply(channel, message).fail(str(error))
            return
        if mode is ReplyMode.ALL:
            await self.answer(message, channel)
        elif addressed and mode is ReplyMode.MENTIONS:
            await self.answer(message, channel, around=self._around(message))
        elif addressed and isinstance(channel, discord.TextChannel):
            try:  # the message is this process's before a side effect outside a turn
                account = account_of(message)
                async with self.bot.engine.claimed(scope, str(message.id), account):
                    await self._answer_in_thread(message, channel, in_order)
            except OverLimit as over:
                await refuse(message, over)
            except (AlreadyClaimed, ShuttingDown):
                log.debug("message %s is answered elsewhere", message.id)
            except StoreUnavailable as error:
                await LiveReply(channel, message).fail(str(error))
        elif addressed:  # threads mode, in a place that cannot hold threads
            await self.answer(message, channel, around=self._around(message))

    async def _answer_in_thread(
        self,
        message: discord.Message,
        channel: discord.TextChannel,
        in_order: contextlib.AsyncExitStack,
    ) -> None:
        me = self.bot.user
        assert me is not None
        first_line = readable_text(message, me.id).split("\n", 1)[0][:80].strip()
        name = first_line or f"Chat with {message.author.display_name}"
        try:
            thread = await message.create_thread(name=name)
        except discord.HTTPException as error:  # e.g. no Create Public Threads permission
            opened = channel.guild.get_thread(message.id)  # by a process that died meanwhile
            if opened is None:
                log.warning("could not open a thread for %s: HTTP %s", message.id, error.status)
                await self.answer(message, channel, claimed=True, around=self._around(message))
                return
            thread = opened
        else:
            await self.bot.thread_names.opened(thread)
        await in_order.aclose()  # a thread is a session of its own: answers there run in parallel
        await self.answer(message, thread, claimed=True, around=self._around(message))

    async def answer(
        self,
        message: discord.Message,
        channel: discord.abc.Messageable,
        claimed: bool = False,
        around: ChannelContextSource | None = None,
    ) -> None:
        """Stream the engine's answer into `channel` (the message's own, or its new thread).
        The turn claims the message, so a duplicate delivery, or the same event seen by
        another process, is answered once; turns follow the messages' order. `around`
        collects the channel's messages around it, once this process holds the turn."""
        me = self.bot.user
        assert me is not None
        reference = message if channel == message.channel else None
        live = LiveReply(channel, reference)
        scope = scope_for(channel.id)  # type: ignore[attr-defined]
        parent = parent_of(channel)
        try:
            async with contextlib.AsyncExitStack() as typing:

                async def show_typing() -> None:
                    """Once this process has the turn: another process that saw the same
                    message gives it up before this point, and shows nothing."""
                    try:
                        await typing.enter_async_context(channel.typing())
                    except discord.HTTPException as error:  # no reason to fail the answer
                        log.debug("no typing indicator in %s: HTTP %s", scope, error.status)

                user = await user_message(message, me.id)
                reply = await self.bot.engine.reply(
                    scope,
                    user,
                    user_ref=str(message.id),
                    order=message.id,
                    claim=None if claimed else str(message.id),
                    on_text=live.feed,
                    on_begin=show_typing,
                    parent=parent.scope if parent else None,
                    account=account_of(message),
                    limits_checked=claimed,  # by `claimed`, with the message
                    around=around,
                )
            notes = SHORTENED_NOTE if reply.shortened else ""
            notes += f"\n\n-# {WITHOUT_HISTORY_NOTE}" if reply.without_history else ""
            notes += "" if reply.kept else f"\n\n-# {NOT_KEPT_NOTE}"
            with self.bot.engine.metrics.timed(TurnPart.DISCORD):
                await live.finish(reply.text + notes)
            if reply.kept:  # where /retry edits it
                await self.bot.engine.note_answer(scope, str(message.id), live.message_ids)
            if reply.kept and isinstance(channel, discord.Thread) and channel.owner_id == me.id:
                question = readable_text(message, me.id)
                self.bot.thread_names.answered(channel, question, reply.text, account_of(message))
        except AnsweredElsewhere:  # this process stalled; the other's answer is the one
            deleted = await live.discard()
            log.warning(
                "message %s was taken over by another process while this one was stalled past "
                "its lease; this answer stopped (%d partial message(s) deleted)",
                message.id,
                deleted,
            )
        except (AlreadyClaimed, ShuttingDown):
            log.debug("message %s is answered elsewhere", message.id)
        except OverLimit as over:
            await refuse(message, over)
        except asyncio.CancelledError:  # stopping: the message was handed back
            if live.started:
                with contextlib.suppress(discord.HTTPException, aiohttp.ClientError, TimeoutError):
                    await asyncio.wait_for(live.fail(INTERRUPTED), HAND_BACK_SECONDS / 2)
            raise
        except BotError as error:
            await live.fail(str(error))
        except Exception:
            log.exception("answering message %s in %s failed", message.id, scope)
            await live.fail(UNEXPECTED)

    async def catch_up(self, backfill: Backfill) -> None:
        """At start-up, answer what was addressed to the bot while no process ran: the core
        picks the places and where to read from; each message read takes the normal path
        (which decides whether it is for the bot), oldest first. Claims keep it to once,
        with another process catching up or answering live at the same time. Of more
        missed messages than the limit, the newest are read: so a second process catching
        up, which sees some of them answered already, reads none that the first left out."""
        if not backfill.max_age_seconds:
            return
        since = discord.utils.utcnow() - datetime.timedelta(seconds=backfill.max_age_seconds)
        oldest = discord.utils.time_snowflake(since)

        def newest(scope: str) -> int | None:
            channel_id = channel_of(scope)
            if channel_id is None:
                return 0  # not a Discord place
            channel = self.bot.get_channel(channel_id)
            if channel is None:
                return None  # a DM or an archived thread: only Discord knows
            return getattr(channel, "last_message_id", None) or 0

        def serves(server: str | None) -> bool:
            """Whether this process runs the place's guild (a DM's: shard 0); unknown (a
            place noted before servers were kept) is looked at when read."""
            return server is None or self.bot.runs_guild(guild_of(server))

        try:
            places = await self.bot.engine.places_to_catch_up(newest, oldest, serves)
        except StoreUnavailable:
            log.warning("could not look for messages missed while stopped: storage unavailable")
            return
        if places:
            log.info("reading %d place(s) for messages missed while stopped", len(places))
        await asyncio.gather(
            *(self._catch_up_in(scope, after, backfill.max_messages) for scope, after in places)
        )

    async def _catch_up_in(self, scope: str, after: int, limit: int) -> None:
        channel_id = channel_of(scope)
        assert channel_id is not None
        try:
            channel = self.bot.get_channel(channel_id) or await self.bot.fetch_channel(channel_id)
            if not isinstance(channel, discord.abc.Messageable):
                return
            guild = getattr(channel, "guild", None)
            if not self.bot.runs_guild(guild and guild.id):
                log.debug("%s is on another process's shard; it catches up there", scope)
                return
            newest_first = channel.history(
                limit=limit, after=discord.Object(after), oldest_first=False
            )
            missed = [m async for m in newest_first]
        except (discord.HTTPException, aiohttp.ClientError) as error:
            log.warning("could not read missed messages in %s: %s", scope, error)
            return
        for message in reversed(missed):
            if self.bot.engine.draining:
                return
            await self.on_message(message)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A user message deleted in Discord leaves the stored history too."""
        await self._forget(payload.channel_id, [payload.message_id], payload.guild_id)

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """So does each message of a moderator's bulk delete."""
        await self._forget(payload.channel_id, sorted(payload.message_ids), payload.guild_id)

    async def _forget(self, channel_id: int, message_ids: list[int], guild_id: int | None) -> None:
        """The message that opened a thread (`threads` mode) is stored in that thread, whose
        id is the message's, while Discord's delete event names the parent channel."""
        for message_id in message_ids:
            ref = str(message_id)
            try:
                if not await self.bot.engine.forget(scope_for(channel_id), ref) and guild_id:
                    await self.bot.engine.forget(scope_for(message_id), ref)
            except StoreUnavailable:
                log.warning(
                    "could not forget %d deleted message(s) in %s: storage unavailable",
                    len(message_ids),
                    channel_id,
                )
                return
            except DamagedState as damaged:  # nothing was changed; /clear or /new repairs it
                log.warning(
                    "could not forget %d deleted message(s) in %s: %s",
                    len(message_ids),
                    channel_id,
                    damaged,
                )
                return
            except CorruptSession as damaged:  # that session only; the others may be fine
                log.warning("could not forget deleted message %s: %s", message_id, damaged)
