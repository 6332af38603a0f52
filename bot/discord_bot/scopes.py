"""Where a Discord conversation lives: every channel, thread and DM has its own channel ID,
so that ID alone names the scope (a thread never shares its parent's history, but inherits
its persona)."""

from __future__ import annotations

import discord

from bot.commands import Parent
from bot.usage import Account, direct_server

_PREFIX = "discord:"


def scope_for(channel_id: int) -> str:
    return f"{_PREFIX}{channel_id}"


def scope_of(interaction: discord.Interaction) -> str:
    """The place a slash command was used in."""
    return scope_for(interaction.channel_id or 0)


def channel_of(scope: str) -> int | None:
    """The channel a scope belongs to; None for a scope that is not Discord's (the console)."""
    rest = scope.removeprefix(_PREFIX)
    return int(rest) if rest != scope and rest.isdigit() else None


def parent_of(channel: object) -> Parent | None:
    """The channel a thread inherits its persona from; None for anything else."""
    if isinstance(channel, discord.Thread) and channel.parent_id:
        return Parent(scope_for(channel.parent_id), f"parent channel <#{channel.parent_id}>")
    return None


def place_name(channel: object) -> str:
    """How users are told about the place itself ("this thread")."""
    if isinstance(channel, discord.Thread):
        return "this thread"
    if isinstance(channel, discord.DMChannel):
        return "this DM"
    return "this channel"


def server_for(guild_id: int | None, user_id: int) -> str:
    """Whose usage counters a message counts in: its guild's, or in a DM the user's own."""
    return f"guild:{guild_id}" if guild_id is not None else direct_server(str(user_id))


def guild_of(server: str) -> int | None:
    """The guild `server_for` named (None: a DM's server, or one not a guild's)."""
    rest = server.removeprefix("guild:")
    return int(rest) if rest != server and rest.isdigit() else None


def account_for(interaction: discord.Interaction) -> Account:
    """Who a command's model calls (/retry, /compact) are charged to: the person who ran it.
    Manage Server makes them an admin, as for a message (in a DM nobody is)."""
    user = interaction.user.id
    admin = interaction.guild_id is not None and interaction.permissions.manage_guild
    return Account(server_for(interaction.guild_id, user), str(user), admin)
