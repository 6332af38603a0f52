"""`python -m bot` in its own process, against the fake Discord.

discord.py reads its REST base and gateway address from class attributes and has no setting
for them, so this sets both (as `FakeDiscord.point_discord_py_here` does in-process) and then
runs the bot's real entry point unchanged. Everything else comes from the environment."""

from __future__ import annotations

import os
import sys

import discord
import yarl

from bot.__main__ import main

if __name__ == "__main__":
    discord.http.Route.BASE = os.environ["FAKE_DISCORD_API"]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ["FAKE_DISCORD_GATEWAY"])
    sys.exit(main([]))
