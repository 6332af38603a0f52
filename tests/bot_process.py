"""`python -m bot` in its own process, against the fake Discord.

discord.py reads its REST base and gateway address from class attributes and has no setting
for them, so this sets both (as `FakeDiscord.point_discord_py_here` does in-process) and then
runs the bot's real entry point unchanged. Everything else comes from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


class BotProcess:
    """`python -m tests.bot_process` with `env`, its output in `log`; a test sends it real
    signals (`process.send_signal`, `process.kill`)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.bot_process"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def wait_connected(bots: list[BotProcess], timeout: float = 30) -> None:
    """Until every process logged that it is connected (fails if one exits first)."""
    deadline = time.monotonic() + timeout
    while not all("connected as" in bot.text() for bot in bots):
        running = all(bot.process.poll() is None for bot in bots)
        assert running and time.monotonic() < deadline, [bot.text() for bot in bots]
        time.sleep(0.05)


if __name__ == "__main__":
    discord.http.Route.BASE = os.environ["FAKE_DISCORD_API"]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ["FAKE_DISCORD_GATEWAY"])
    sys.exit(main([]))
