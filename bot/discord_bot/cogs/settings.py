"""`/model`, `/mcp`, `/mode`, `/persona` and `/context`: what the model is, which tools it
has, when the bot answers, who it is in this channel and what of the channel it reads. In
servers these are for members with Manage Server (Discord enforces the command's default
permissions; admins can change them in the server's settings); in DMs the user owns their
session."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.commands import CHANNEL_CONTEXT_HELP, PERSONA_MAX_CHARS, REPLY_MODE_HELP, ReplyMode
from bot.discord_bot.conversation import UNEXPECTED
from bot.discord_bot.render import FORM, PRIVATE, respond, show_form
from bot.discord_bot.scopes import parent_of, place_name, scope_of
from bot.errors import BotError

if TYPE_CHECKING:
    from bot.discord_bot.client import ChatBot

log = logging.getLogger(__name__)

ADMIN = discord.Permissions(manage_guild=True)
FORM_TIMEOUT_SECONDS = 15 * 60
"""How long a /persona form waits for its submission (Discord's interaction lifetime)."""
MODE_CHOICES = [
    app_commands.Choice(name=f"{mode.value}: {REPLY_MODE_HELP[mode]}", value=mode.value)
    for mode in ReplyMode
]


def _scope(interaction: discord.Interaction) -> str:
    return scope_of(interaction)


class PersonaForm(discord.ui.Modal):
    """`/persona set` without text: a paragraph field (line breaks kept), holding the place's
    own persona when it has one. Its submission is a new interaction that only this process
    receives a form for, so it is handled once."""

    def __init__(self, bot: ChatBot, scope: str, title: str, current: str | None) -> None:
        super().__init__(title=title, timeout=FORM_TIMEOUT_SECONDS)
        self.bot, self.scope = bot, scope
        self.text: discord.ui.TextInput[PersonaForm] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            default=current,
            placeholder="You are a patient tutor for this channel. You answer with examples.",
            min_length=1,
            max_length=PERSONA_MAX_CHARS,
        )
        self.add_item(
            discord.ui.Label(
                text="Who the bot is here, and how it answers",
                description="Replaces the default system prompt; line breaks are kept.",
                component=self.text,
            )
        )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        reply = await self.bot.session_commands.set_persona(self.scope, self.text.value)
        await respond(interaction, reply)

    async def on_error(  # type: ignore[override]
        self, interaction: discord.Interaction, error: Exception
    ) -> None:
        """As a command's error: a `BotError`'s one line, privately; anything else logged."""
        if isinstance(error, BotError):
            text = f"⚠️ {error}"
        else:
            log.error("the /persona form failed", exc_info=error)
            text = f"⚠️ {UNEXPECTED}"
        try:
            await respond(interaction, text, ephemeral=True)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as refused:
            log.warning("could not tell the user /persona failed: %s", type(refused).__name__)


class Settings(commands.Cog):
    mcp = app_commands.Group(
        name="mcp", description="The MCP servers (tools) of this session", default_permissions=ADMIN
    )
    persona = app_commands.Group(
        name="persona",
        description="Who the bot is here: a system prompt replacing the default",
        default_permissions=ADMIN,
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @app_commands.command(
        description="Show the models, or switch this session's model",
        extras={PRIVATE: lambda options: "name" not in options},  # the list is a view
    )
    @app_commands.describe(name="A model from the list, or its number")
    @app_commands.default_permissions(manage_guild=True)
    async def model(self, interaction: discord.Interaction, name: str | None = None) -> None:
        text = await self.bot.session_commands.model(scope_of(interaction), name)
        await respond(interaction, text)

    @model.autocomplete("name")
    async def _model_names(
        self, interaction: discord.Interaction, typed: str
    ) -> list[app_commands.Choice[str]]:
        models = [m for m in self.bot.session_commands.allowed_models if typed.lower() in m.lower()]
        return [app_commands.Choice(name=m, value=m) for m in models[:25]]

    @mcp.command(name="add", description="Give the model an MCP server's tools")
    @app_commands.describe(server="A marketplace slug like org/name[@version], or an https:// URL")
    async def mcp_add(self, interaction: discord.Interaction, server: str) -> None:
        await respond(
            interaction, await self.bot.session_commands.mcp_add(scope_of(interaction), server)
        )

    @mcp.command(name="remove", description="Take an MCP server away")
    @app_commands.describe(server="The server, as /mcp list shows it")
    async def mcp_remove(self, interaction: discord.Interaction, server: str) -> None:
        text = await self.bot.session_commands.mcp_remove(scope_of(interaction), server)
        await respond(interaction, text)

    @mcp.command(name="list", description="Show this session's MCP servers", extras={PRIVATE: True})
    async def mcp_list(self, interaction: discord.Interaction) -> None:
        text = await self.bot.session_commands.mcp_list(scope_of(interaction))
        await respond(interaction, text)

    @mcp.command(name="clear", description="Remove all MCP servers")
    async def mcp_clear(self, interaction: discord.Interaction) -> None:
        text = await self.bot.session_commands.mcp_clear(scope_of(interaction))
        await respond(interaction, text)

    @app_commands.command(description="Choose when the bot answers in this channel")
    @app_commands.describe(mode="mentions (default), every message, or a thread per mention")
    @app_commands.choices(
        mode=[
            app_commands.Choice(name=f"{m.value}: {REPLY_MODE_HELP[m]}", value=m.value)
            for m in ReplyMode
        ]
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def mode(self, interaction: discord.Interaction, mode: str) -> None:
        scope = scope_of(interaction)
        text = await self.bot.session_commands.set_reply_mode(scope, mode)
        self.bot.conversation.remember_mode(scope, ReplyMode(mode))
        await respond(interaction, text)

    @persona.command(
        name="set",
        description="Give the bot a persona in this channel or thread",
        extras={FORM: lambda options: "text" not in options},
    )
    @app_commands.describe(
        text=f"Who the bot is (up to {PERSONA_MAX_CHARS} characters); leave out for a form"
    )
    async def persona_set(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 1, PERSONA_MAX_CHARS] | None = None,
    ) -> None:
        scope = scope_of(interaction)
        if text is None:  # a form, which keeps line breaks, holding the persona to edit
            current = await self.bot.session_commands.own_persona(scope)
            title = f"Persona for {place_name(interaction.channel)}"
            await show_form(interaction, PersonaForm(self.bot, scope, title, current))
            return
        reply = await self.bot.session_commands.set_persona(scope, text)
        await respond(interaction, reply)

    @persona.command(
        name="show", description="Show the persona in effect here", extras={PRIVATE: True}
    )
    async def persona_show(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        text = await self.bot.session_commands.show_persona(
            scope_of(interaction), place_name(channel), parent_of(channel)
        )
        await respond(interaction, text)

    @persona.command(name="clear", description="Remove this place's own persona")
    async def persona_clear(self, interaction: discord.Interaction) -> None:
        text = await self.bot.session_commands.clear_persona(
            scope_of(interaction), parent_of(interaction.channel)
        )
        await respond(interaction, text)

    @app_commands.command(
        name="context",
        description="Whether a mention shows the model the channel's recent messages",
    )
    @app_commands.describe(state="on (default) or off")
    @app_commands.choices(
        state=[
            app_commands.Choice(name=f"{state}: {CHANNEL_CONTEXT_HELP[state == 'on']}", value=state)
            for state in ("on", "off")
        ]
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def channel_context(self, interaction: discord.Interaction, state: str) -> None:
        scope = scope_of(interaction)
        text = await self.bot.session_commands.set_channel_context(scope, state)
        self.bot.conversation.remember_channel_context(scope, state.strip().lower() == "on")
        await respond(interaction, text)
