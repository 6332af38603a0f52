"""The whole bot against the fakes: the project's ChatBot on the real discord.py client,
connected to the fake Discord, answering through the real SDK from the fake Dedalus API,
storing in real Redis. `restart()` replaces every object, as a new process would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from bot.commands import Commands
from bot.config import PERSONA_NOTE
from bot.context import CHANNEL_CONTEXT_MESSAGES
from bot.discord_bot.client import ChatBot
from bot.discord_bot.scopes import scope_for
from bot.engine import Engine, EngineLimits
from bot.model import DedalusModel, ModelChoice
from bot.store.base import Message, StorePolicy
from bot.store.redis import RedisStore
from bot.titles import ThreadTitles
from bot.usage import UsageLimits
from tests.conftest import TEST_MODELS
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord
from tests.fakes.discord_world import Message as PostedMessage

SYSTEM = "You are the test bot."


class Harness:
    def __init__(self, discord: FakeDiscord, api: FakeDedalusAPI, redis_url: str) -> None:
        self.discord = discord
        self.api = api
        self.redis_url = redis_url
        self.budget_bytes = 200_000
        self.dev_guild_id: int | None = None
        self.channel_context_messages = CHANNEL_CONTEXT_MESSAGES
        """At most this many earlier messages go with a mention; set it, then `restart()`."""
        self.policy = StorePolicy(TEST_MODELS[0])
        """The store's limits; set it, then `restart()`."""
        self.allowed_models: tuple[str, ...] = TEST_MODELS
        """`ALLOWED_MODELS` (the default is the policy's); set it, then `restart()`."""
        self.usage_limits = UsageLimits()
        """Messages per minute and tokens per day; set them, then `restart()`."""
        self.clock: Callable[[], float] = time.time
        """What the engine and commands take for the time (a test may move it forward)."""
        self.bot: ChatBot | None = None
        self.store: RedisStore | None = None
        self.model: DedalusModel | None = None
        self._running: asyncio.Task[None] | None = None

    async def start(self) -> ChatBot:
        self.store = RedisStore.from_url(self.redis_url, self.policy)
        self.model = model = DedalusModel.connect(
            "test-key", self.api.base_url, timeout=60, max_retries=0
        )
        models = ModelChoice(self.allowed_models, self.policy.default_model)
        limits = EngineLimits(
            SYSTEM,
            self.budget_bytes,
            message_cap_bytes=self.policy.message_cap_bytes,
            persona_note=PERSONA_NOTE,
            models=models,
            usage=self.usage_limits,
        )
        engine = Engine(self.store, model, limits, clock=lambda: self.clock())
        bot = ChatBot(
            engine,
            Commands(
                self.store, models.allowed, models.default, engine.summaries, lambda: self.clock()
            ),
            dev_guild_id=self.dev_guild_id,
            titles=ThreadTitles(self.store, model, lambda: self.clock()),
            channel_context_messages=self.channel_context_messages,
            guild_ready_timeout=0.1,
        )
        self.bot = bot
        self._running = running = asyncio.create_task(bot.start(self.discord.token))
        await self.discord.wait_for(lambda: bot.is_ready() or running.done(), what="ready")
        if running.done():
            running.result()
        return bot

    async def stop(self) -> None:
        if self.bot is not None and self._running is not None:
            await self.bot.close()
            await self._running
            await self.bot.engine.background_done()  # a summary being written, if any
        if self.store is not None:
            await self.store.close()
        if self.model is not None:  # its HTTP client, closed in this loop, not by the GC later
            await self.model.close()
        self.bot = self.store = self._running = self.model = None

    async def restart(self) -> ChatBot:
        await self.stop()
        return await self.start()

    async def history(self, channel_id: int, session: str = "default") -> list[Message]:
        assert self.store is not None
        return await self.store.read_history(scope_for(channel_id), session)

    async def answer(self, channel_id: int, count: int = 1, **wait: Any) -> list[PostedMessage]:
        """Wait for the bot's `count`-th answer in the channel (slash command responses do
        not count) and for its turn to finish (edits done), then return its answers there."""
        await self.discord.wait_for(
            lambda: len(self.answers(channel_id)) >= count,
            what=f"{count} answer(s) in channel {channel_id}",
            **wait,
        )
        await self.settled()
        return self.answers(channel_id)

    def answers(self, channel_id: int) -> list[PostedMessage]:
        return [m for m in self.discord.bot_messages(channel_id) if m.interaction_id is None]

    async def settled(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until the bot has finished handling every message it received: discord.py
        runs each event handler as a task named for its event, and the answer's last edit
        happens inside it (after the turn released its lock); a thread's title is written
        after that, in a task of its own."""

        def handling() -> list[asyncio.Task[Any]]:
            return [
                task
                for task in asyncio.all_tasks()
                if task.get_name().startswith(("discord.py: on_", "title thread"))
                and not task.done()
            ]

        deadline = asyncio.get_running_loop().time() + timeout
        quiet_checks = 0
        while quiet_checks < 3:  # quiet for a few polls: an echo may start another handler
            quiet_checks = 0 if handling() else quiet_checks + 1
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the bot is still handling: {handling()}")
            await asyncio.sleep(0.02)

    async def say(self, channel_id: int, author: dict[str, Any], content: str, **kw: Any) -> int:
        return self.discord.user_says(channel_id, author, content, **kw)

    async def command(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: dict[str, Any],
        channel_id: int,
        subcommand: str | None = None,
    ) -> str:
        interaction = self.discord.invoke(
            name, options, user=user, channel_id=channel_id, subcommand=subcommand
        )
        reply = await self.discord.wait_interaction_reply(interaction)
        return reply.text
