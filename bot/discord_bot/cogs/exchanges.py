"""`/retry` and `/undo`: the last exchange of this place's session, answered again or taken
back. Everyone may use them on a question they asked; a member with Manage Server (in a DM,
the user) on any. The core checks who may, under the session's lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.commands import describe_retried, describe_undone
from bot.discord_bot.conversation import SHORTENED_NOTE
from bot.discord_bot.render import PRIVATE, LiveReply, Posted, respond
from bot.discord_bot.scopes import account_for, parent_of, scope_of
from bot.errors import InvalidInput
from bot.store.base import Exchange

if TYPE_CHECKING:
    from bot.discord_bot.client import ChatBot

log = logging.getLogger(__name__)

RESTORE_SECONDS = 2.5
"""How long a failed /retry may take to show the old answer again (a stop is waiting)."""


def manages(interaction: discord.Interaction) -> bool:
    """Whether the member may rewrite anyone's exchange here: in a DM the user owns the
    session; in a server, Manage Server (which admins have) decides."""
    return interaction.guild_id is None or interaction.permissions.manage_guild


Chat = (
    discord.TextChannel
    | discord.Thread
    | discord.VoiceChannel
    | discord.DMChannel
    | discord.PartialMessageable
)
"""Where a conversation's answers can be edited in place."""


def _messages(channel: Chat, ids: tuple[str, ...]) -> list[Posted]:
    return [channel.get_partial_message(int(i)) for i in ids if i.isdigit()]


def _old_answer(exchange: Exchange) -> str:
    """The text the old answer showed (its last reply with text)."""
    texts = [m.get("content") for m in exchange.answer if m.get("role") == "assistant"]
    return next((t for t in reversed(texts) if isinstance(t, str) and t), "")


class Exchanges(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @app_commands.command(
        description="Write the last answer here again (yours, or any with Manage Server)",
        extras={PRIVATE: True},  # the answer itself changes in place, for everyone
    )
    async def retry(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        if not isinstance(channel, Chat):
            raise InvalidInput("There is no conversation to retry here.")
        scope = scope_of(interaction)
        shown: list[tuple[LiveReply, Exchange]] = []

        async def begin(exchange: Exchange) -> None:
            """Once the session is held: the old answer's messages are edited in place."""
            question = _messages(channel, (exchange.ref,) if exchange.ref else ())
            posted = _messages(channel, exchange.replies)
            shown.append(
                (LiveReply(channel, question[0] if question else None, posted=posted), exchange)
            )

        async def feed(delta: str) -> None:
            await shown[0][0].feed(delta)

        try:
            retried = await self.bot.engine.retry(
                scope,
                requester=str(interaction.user.id),
                manager=manages(interaction),
                order=interaction.id,
                on_text=feed,
                on_begin=begin,
                parent=parent.scope if (parent := parent_of(channel)) else None,
                account=account_for(interaction),
            )
        except BaseException:
            if shown and shown[0][0].changed:  # nothing was saved: show the old answer again
                live, exchange = shown[0]
                with contextlib.suppress(discord.HTTPException, aiohttp.ClientError, TimeoutError):
                    await asyncio.wait_for(live.finish(_old_answer(exchange)), RESTORE_SECONDS)
            raise
        live = shown[0][0]
        try:
            await live.finish(retried.text + (SHORTENED_NOTE if retried.shortened else ""))
        except (discord.HTTPException, aiohttp.ClientError) as error:  # saved all the same
            log.warning("could not show a retried answer in full: %s", type(error).__name__)
        exchange = retried.exchange
        if exchange.ref is not None:
            await self.bot.engine.note_answer(scope, exchange.ref, live.message_ids)
        await respond(interaction, describe_retried(exchange))

    @app_commands.command(
        description="Take back the last question here and its answer (yours, or any with "
        "Manage Server)"
    )
    async def undo(self, interaction: discord.Interaction) -> None:
        exchange = await self.bot.engine.undo(
            scope_of(interaction),
            requester=str(interaction.user.id),
            manager=manages(interaction),
            order=interaction.id,
        )
        await respond(interaction, describe_undone(exchange))
