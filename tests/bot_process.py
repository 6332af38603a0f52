"""`python -m bot` in its own process, against the fake Discord.

discord.py reads its REST base and gateway address from class attributes and has no setting
for them, so this sets both (as `FakeDiscord.point_discord_py_here` does in-process) and then
runs the bot's real entry point unchanged. Everything else comes from the environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import discord
import yarl

from bot.__main__ import main

if TYPE_CHECKING:
    from tests.fakes.dedalus_api import FakeDedalusAPI
    from tests.fakes.discord_gateway import FakeDiscord

ROOT = Path(__file__).resolve().parents[1]


def bot_environment(
    fake: FakeDiscord, api: FakeDedalusAPI, redis_url: str | None, **settings: str
) -> dict[str, str]:
    """The whole environment of `python -m tests.bot_process` against these fakes (nothing
    inherited, so no setting of the machine leaks in), plus `settings`. Without a Redis URL
    the bot uses its SQLite file (`SQLITE_PATH` in `settings`)."""
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "FAKE_DISCORD_API": fake.api_base,
        "FAKE_DISCORD_GATEWAY": fake.gateway_url,
        "DISCORD_TOKEN": fake.token,
        **({"REDIS_URL": redis_url} if redis_url else {}),
        **api.env(),
        **settings,
    }


if __name__ == "__main__":
    discord.http.Route.BASE = os.environ["FAKE_DISCORD_API"]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ["FAKE_DISCORD_GATEWAY"])
    sys.exit(main([]))
