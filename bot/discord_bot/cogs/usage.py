"""`/usage`: what the model cost here, for the server's admins (Manage Server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_bot.render import PRIVATE, respond
from bot.discord_bot.scopes import server_for

if TYPE_CHECKING:
    from bot.discord_bot.client import ChatBot

USER_MENTION = "<@{}>"
"""Users are shown as mentions, which Discord renders as names; `respond` pings nobody."""


class Usage(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @app_commands.command(
        description="Tokens used in this server today and in the last 30 days, and by whom",
        extras={PRIVATE: True},
    )
    @app_commands.default_permissions(manage_guild=True)
    async def usage(self, interaction: discord.Interaction) -> None:
        server = server_for(interaction.guild_id, interaction.user.id)
        await respond(interaction, await self.bot.session_commands.usage(server, USER_MENTION))
