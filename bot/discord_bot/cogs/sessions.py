"""`/new /list /load /clear /compact /status`: the session commands, acting on the channel,
thread or DM where they are used; and `/export`, which sends the session as a file."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_bot.render import PRIVATE, respond, respond_with_file
from bot.discord_bot.scopes import (
    account_for,
    parent_of,
    place_name,
    scope_for,
    scope_of,
    server_for,
)
from bot.discord_bot.thread_titles import THREAD_NAME_MAX
from bot.errors import BotError, InvalidInput
from bot.exports import EXPORT_HELP, ExportFormat
from bot.store.base import checked_session_name

if TYPE_CHECKING:
    from bot.discord_bot.client import ChatBot

log = logging.getLogger(__name__)

DM_NAME = "dm"
"""What `/forget-channel` asks to be typed in a DM, which has no name of its own."""


class Sessions(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @app_commands.command(description="Start a fresh conversation here; the old one stays in /list")
    @app_commands.describe(
        name="A name for the session (up to 100 characters)",
        thread="Open a new thread with its own conversation instead",
    )
    async def new(
        self, interaction: discord.Interaction, name: str | None = None, thread: bool = False
    ) -> None:
        if not thread:
            text = await self.bot.session_commands.new(scope_of(interaction), name)
            await respond(interaction, text)
            return
        channel = interaction.channel
        if not isinstance(channel, discord.TextChannel):
            raise InvalidInput("A thread can be opened only in a server's text channel.")
        # Checked before the thread is opened, so a refused name leaves no thread behind.
        scope_name = checked_session_name(name) if name and name.strip() else None
        thread_name = scope_name or f"Chat with {interaction.user.display_name}"
        started = await channel.create_thread(
            name=thread_name[:THREAD_NAME_MAX], type=discord.ChannelType.public_thread
        )
        await self.bot.thread_names.opened(started)
        if scope_name:
            await self.bot.session_commands.new(scope_for(started.id), scope_name)
        await respond(interaction, f"Opened {started.mention}: I answer every message there.")

    @app_commands.command(
        name="list", description="Show this place's sessions", extras={PRIVATE: True}
    )
    async def list_sessions(self, interaction: discord.Interaction) -> None:
        text = await self.bot.session_commands.list(scope_of(interaction))
        await respond(interaction, text)

    @app_commands.command(description="Switch this place to another saved session")
    @app_commands.describe(name="The session to continue")
    async def load(self, interaction: discord.Interaction, name: str) -> None:
        text = await self.bot.session_commands.load(scope_of(interaction), name)
        await respond(interaction, text)

    @load.autocomplete("name")
    async def _loadable_names(
        self, interaction: discord.Interaction, typed: str
    ) -> list[app_commands.Choice[str]]:
        return await self._session_names(interaction, typed)

    async def _session_names(
        self, interaction: discord.Interaction, typed: str
    ) -> list[app_commands.Choice[str]]:
        scope = scope_of(interaction)
        command = interaction.command and interaction.command.name
        try:
            sessions = await self.bot.session_commands.store.list_sessions(scope)
        except BotError as error:  # storage down, or the place's own state damaged
            log.warning("autocomplete for /%s in %s offers nothing: %s", command, scope, error)
            return []
        names = [s.name for s in sessions if typed.lower() in s.name.lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    @app_commands.command(description="Forget this session's history (settings stay)")
    @app_commands.default_permissions(manage_guild=True)
    async def clear(self, interaction: discord.Interaction) -> None:
        text = await self.bot.session_commands.clear(scope_of(interaction))
        await respond(interaction, text)

    @app_commands.command(description="Delete a session and everything stored with it")
    @app_commands.describe(name="The session to delete (the current one: a fresh one replaces it)")
    @app_commands.default_permissions(manage_guild=True)
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        text = await self.bot.session_commands.delete(scope_of(interaction), name)
        await respond(interaction, text)

    @delete.autocomplete("name")
    async def _deletable_names(
        self, interaction: discord.Interaction, typed: str
    ) -> list[app_commands.Choice[str]]:
        return await self._session_names(interaction, typed)

    @app_commands.command(
        name="forget-channel",
        description="Delete everything the bot stores for this channel, thread or DM",
    )
    @app_commands.describe(confirm=f"To confirm, type this channel's name (in a DM: {DM_NAME})")
    @app_commands.default_permissions(manage_guild=True)
    async def forget_channel(self, interaction: discord.Interaction, confirm: str) -> None:
        scope = scope_of(interaction)
        channel = interaction.channel
        name = DM_NAME if isinstance(channel, discord.DMChannel) else getattr(channel, "name", "")
        text = await self.bot.session_commands.forget_place(scope, confirm, name or DM_NAME)
        self.bot.conversation.forget_mode(scope)
        await respond(interaction, text)

    @app_commands.command(
        description="Summarize this session's history now; the model then sees the summary"
    )
    @app_commands.default_permissions(manage_guild=True)
    async def compact(self, interaction: discord.Interaction) -> None:
        text = await self.bot.session_commands.compact(
            scope_of(interaction), account_for(interaction)
        )
        await respond(interaction, text)

    @app_commands.command(
        description="Get this session as a file, shown only to you", extras={PRIVATE: True}
    )
    @app_commands.describe(format_="json: what python -m bot import reads (default); markdown")
    @app_commands.rename(format_="format")
    @app_commands.choices(
        format_=[
            app_commands.Choice(name=f"{f.value}: {EXPORT_HELP[f]}", value=f.value)
            for f in ExportFormat
        ]
    )
    async def export(
        self, interaction: discord.Interaction, format_: str = ExportFormat.JSON.value
    ) -> None:
        scope = scope_of(interaction)
        exported = await self.bot.session_commands.export(
            scope, format_, interaction.filesize_limit
        )
        await respond_with_file(interaction, exported.summary, exported.filename, exported.data)

    @app_commands.command(
        description="Show this place's session, model, MCP servers, persona and tokens used",
        extras={PRIVATE: True},
    )
    async def status(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        text = await self.bot.session_commands.status(
            scope_of(interaction),
            place_name(channel),
            parent_of(channel),
            server_for(interaction.guild_id, interaction.user.id),
        )
        await respond(interaction, text)
