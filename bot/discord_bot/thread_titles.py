"""Renaming the threads the bot opens once their first answer is posted (see `bot.titles`).

The rename runs in the background after the answer, so it never delays one; its tasks are
tracked, so a shutdown lets them finish within its grace and cancels the rest. Any failure
(storage, the model, Discord refusing the rename) leaves the thread's name as it was and is
logged as one line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import discord

from bot.discord_bot.scopes import scope_for
from bot.errors import BotError, ModelError
from bot.titles import ThreadTitles
from bot.usage import Account

log = logging.getLogger(__name__)

THREAD_NAME_MAX = 100
"""Discord's limit for a thread's name."""
RENAME_SECONDS = 30.0
"""How long a rename may wait (Discord allows two renames of a channel per ten minutes, and
discord.py waits out a rate limit by itself) before it is given up."""
SETTLED_KEPT = 10_000
"""Threads this process knows need no title, remembered so their answers cost no lookup."""


class ThreadNamer:
    """Titles for the bot's threads, off the answer's path. Without `titles`, does nothing."""

    def __init__(self, titles: ThreadTitles | None) -> None:
        self._titles = titles
        self._tasks: set[asyncio.Task[None]] = set()
        self._settled: set[int] = set()
        self._stopping = False

    async def opened(self, thread: discord.Thread) -> None:
        """Remember the name the bot gave a thread it just opened; if storage fails, the
        thread keeps that name for good (one warning line)."""
        if self._titles is None:
            return
        try:
            await self._titles.opened(scope_for(thread.id), thread.name)
        except BotError as error:
            log.warning("thread %s will keep its first name: %s", thread.id, error)

    def answered(
        self, thread: discord.Thread, question: str, answer: str, account: Account
    ) -> None:
        """An answer was posted in a thread the bot opened: title it in the background, if
        it is the first, charging its tokens to `account` (the question's). Nothing new
        starts once the bot is stopping (a thread not titled then is titled after a later
        answer)."""
        if self._titles is None or self._stopping or thread.id in self._settled:
            return
        task = asyncio.create_task(
            self._title(self._titles, thread, question, answer, account),
            name=f"title thread {thread.id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, grace: float) -> None:
        """Start no new title; let those under way finish within `grace` seconds, cancel
        the others (their threads keep their names)."""
        self._stopping = True
        running = list(self._tasks)
        if running:
            await asyncio.wait(running, timeout=grace)
        await self.close()

    async def close(self) -> None:
        self._stopping = True
        running = [task for task in self._tasks if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)

    def _settle(self, thread_id: int) -> None:
        if len(self._settled) >= SETTLED_KEPT:
            self._settled.clear()
        self._settled.add(thread_id)

    async def _title(
        self,
        titles: ThreadTitles,
        thread: discord.Thread,
        question: str,
        answer: str,
        account: Account,
    ) -> None:
        scope = scope_for(thread.id)
        try:
            given = await titles.take(scope)
        except BotError as error:
            log.warning("could not title thread %s: %s", thread.id, error)
            return
        self._settle(thread.id)
        if given is None:  # titled already (or not opened by this bot's titling)
            return
        if thread.name != given:
            log.info("thread %s keeps the name a person gave it", thread.id)
            return
        try:
            title = await titles.write(scope, question, answer, THREAD_NAME_MAX, account)
        except ModelError:  # the model client logged it
            return
        except BotError as error:
            log.warning("could not title thread %s: %s", thread.id, error)
            return
        if title and title != given:
            await self._rename(thread, given, title)

    async def _rename(self, thread: discord.Thread, given: str, title: str) -> None:
        """Rename, unless a person renamed the thread meanwhile: its current name is read
        from Discord right before (a person's rename in the instant between is the one
        case this cannot see)."""
        problem: Any = None
        try:
            async with asyncio.timeout(RENAME_SECONDS):
                current = await thread.guild.fetch_channel(thread.id)
                if not isinstance(current, discord.Thread) or current.name != given:
                    log.info("thread %s keeps the name a person gave it", thread.id)
                    return
                await current.edit(name=title)
        except discord.HTTPException as error:
            problem = f"HTTP {error.status} (code {error.code})"
        except TimeoutError:
            problem = f"still rate limited after {RENAME_SECONDS:.0f} s"
        except (aiohttp.ClientError, OSError) as error:
            problem = type(error).__name__
        if problem is not None:
            log.warning("could not rename thread %s: %s", thread.id, problem)
