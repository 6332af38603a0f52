"""The Discord bot: one `Bot` subclass that owns the engine and commands (passed in by the
composition root), loads the cogs and syncs the slash commands in `setup_hook`."""

from __future__ import annotations

import asyncio
import logging
import math
import signal

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.commands import Commands
from bot.context import CHANNEL_CONTEXT_MESSAGES
from bot.discord_bot.cogs.exchanges import Exchanges
from bot.discord_bot.cogs.sessions import Sessions
from bot.discord_bot.cogs.settings import Settings as SettingsCog
from bot.discord_bot.cogs.usage import Usage
from bot.discord_bot.conversation import UNEXPECTED, Conversation
from bot.discord_bot.render import (
    ANSWERED_ELSEWHERE,
    NO_PINGS,
    PRIVATE,
    opens_form,
    private_answer,
    respond,
)
from bot.discord_bot.scopes import scope_of
from bot.discord_bot.thread_titles import ThreadNamer
from bot.engine import Backfill, Engine
from bot.errors import BotError, SettingsError, StoreUnavailable
from bot.health import Check
from bot.logs import LogFormat, keep_payloads_out, use_json_lines
from bot.store.base import AlreadyClaimed, new_token
from bot.titles import ThreadTitles

log = logging.getLogger(__name__)

AUTOCOMPLETE_LEASE_MS = 60_000
"""How long an autocomplete request stays claimed; Discord waits 3 s for its choices."""


def intents() -> discord.Intents:
    """Guilds and their messages, DMs, and message content (a privileged intent that must be
    switched on in the Developer Portal)."""
    chosen = discord.Intents.none()
    chosen.guilds = True
    chosen.guild_messages = True
    chosen.dm_messages = True
    chosen.message_content = True
    return chosen


class OncePerInteraction(app_commands.CommandTree["ChatBot"]):
    """Acts on each interaction once, whichever process is first.

    Discord delivers every interaction to every process connected with the bot's token and
    accepts one acknowledgement for it: the process whose acknowledgement it accepts runs
    the command, the others stop here with a DEBUG line. Acknowledging before anything else
    (a "thinking" response, as private as the command's answer) also gives a slow command
    15 minutes to answer instead of Discord's 3 seconds."""

    async def interaction_check(self, interaction: discord.Interaction[ChatBot], /) -> bool:
        if interaction.type is discord.InteractionType.autocomplete:
            return await self._claimed(interaction)
        if opens_form(interaction):  # the form it answers with is its acknowledgement
            return True
        private = private_answer(interaction)
        try:
            await interaction.response.defer(ephemeral=private, thinking=True)
        except discord.HTTPException as error:
            if error.code in ANSWERED_ELSEWHERE:
                log.debug("interaction %s answered elsewhere (%s)", interaction.id, error.code)
            else:
                log.warning(
                    "could not acknowledge interaction %s: HTTP %s", interaction.id, error.status
                )
            return False
        except (aiohttp.ClientError, OSError) as error:
            log.warning(
                "could not acknowledge interaction %s: %s", interaction.id, type(error).__name__
            )
            return False
        interaction.extras[PRIVATE] = private
        self._count(interaction)
        return True

    def _count(self, interaction: discord.Interaction[ChatBot]) -> None:
        """Counted by the process that runs it, so the sum over processes is what people did."""
        command = interaction.command.qualified_name if interaction.command else "unknown"
        self.client.engine.metrics.interactions.labels(command).inc()

    async def _claimed(self, interaction: discord.Interaction[ChatBot]) -> bool:
        """An autocomplete request cannot be deferred (its one response is the choices), so
        a lease on its id in the store picks the process that computes them. The lease is
        never settled: it lapses by itself, long after Discord stopped waiting."""
        scope = scope_of(interaction)
        claim = f"interaction:{interaction.id}"
        try:
            await self.client.session_commands.store.claim(
                scope, claim, new_token(), AUTOCOMPLETE_LEASE_MS
            )
        except AlreadyClaimed:
            log.debug("autocomplete %s answered elsewhere", interaction.id)
            return False
        except StoreUnavailable:
            log.warning("autocomplete %s not answered: storage unavailable", interaction.id)
            return False
        self._count(interaction)
        return True


def gateway_check(bot: ChatBot) -> Check:
    """For `/healthz`: healthy while the gateway connection is up."""

    async def connected() -> str | None:
        if bot.is_closed():
            return "gateway closed"
        if not bot.is_ready():
            return "gateway not connected yet"
        if isinstance(bot, discord.AutoShardedClient):
            down = [str(i) for i, shard in sorted(bot.shards.items()) if shard.is_closed()]
            return (
                f"gateway shard(s) {', '.join(down)} disconnected; reconnecting" if down else None
            )
        if bot.ws is None or not bot.ws.open:
            return "gateway disconnected; reconnecting"
        return None

    return connected


def gateway_latencies(bot: ChatBot) -> list[tuple[str, float]]:
    """Heartbeat round trip per shard, for `/metrics` (none before the first heartbeat)."""
    if isinstance(bot, discord.AutoShardedClient):
        latencies = bot.latencies
    else:
        latencies = [(bot.shard_id or 0, bot.latency)]
    return [(str(shard), latency) for shard, latency in latencies if math.isfinite(latency)]


class ChatBot(commands.Bot):
    def __init__(
        self,
        engine: Engine,
        session_commands: Commands,
        *,
        dev_guild_id: int | None = None,
        backfill: Backfill | None = None,
        titles: ThreadTitles | None = None,
        syncs_commands: bool = True,
        channel_context_messages: int = CHANNEL_CONTEXT_MESSAGES,
        **options: object,
    ) -> None:
        super().__init__(
            command_prefix=(),
            intents=intents(),
            allowed_mentions=NO_PINGS,
            help_command=None,
            tree_cls=OncePerInteraction,
            **options,  # type: ignore[arg-type]
        )
        self.engine = engine
        self.session_commands = session_commands
        self.conversation = Conversation(self, channel_context_messages)
        self.thread_names = ThreadNamer(titles)
        """Titles the threads the bot opens (none without `titles`)."""
        self._dev_guild_id = dev_guild_id
        self._syncs_commands = syncs_commands
        self._backfill = backfill or Backfill()
        self._catching_up: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        await self.add_cog(self.conversation)
        await self.add_cog(Sessions(self))
        await self.add_cog(SettingsCog(self))
        await self.add_cog(Exchanges(self))
        await self.add_cog(Usage(self))
        self.tree.on_error = self._command_failed  # type: ignore[method-assign]
        if not self._syncs_commands:
            log.info("slash commands are synced by the process running shard 0")
        elif self._dev_guild_id:
            guild = discord.Object(self._dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    async def on_ready(self) -> None:
        log.info(
            "connected as %s (id %s) to %d server(s)",
            self.user,
            self.application_id,
            len(self.guilds),
        )
        if self._catching_up is None:  # once per start, not after each reconnect
            self._catching_up = asyncio.create_task(self.conversation.catch_up(self._backfill))

    async def on_message(self, message: discord.Message) -> None:
        """No prefix commands: conversation is handled by the `Conversation` cog."""

    def runs_guild(self, guild_id: int | None) -> bool:
        """Whether Discord delivers this guild's events (None: a DM's) to this process:
        unsharded, it gets everything."""
        return True

    async def shut_down(self, grace: float) -> None:
        """Take no new messages, let turns in flight (and thread renames) finish within
        `grace` seconds, hand back the others (another process, or the next start, answers
        them), then disconnect."""
        await asyncio.gather(self.engine.drain(grace), self.thread_names.drain(grace))
        await self.close()

    async def close(self) -> None:
        await self.thread_names.close()  # before the HTTP session they use is closed
        await super().close()

    async def _command_failed(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if isinstance(cause, BotError):
            text = f"⚠️ {cause}"
        elif isinstance(cause, app_commands.CheckFailure):
            text = "⚠️ You cannot use this command here."
        else:
            log.error(
                "command /%s failed",
                interaction.command and interaction.command.name,
                exc_info=cause,
            )
            text = f"⚠️ {UNEXPECTED}"
        command = interaction.command and interaction.command.name
        try:
            await respond(interaction, text, ephemeral=True)
        except discord.HTTPException as refused:  # e.g. its "thinking" message was deleted
            log.warning(
                "could not tell the user /%s failed: HTTP %s (code %s)",
                command,
                refused.status,
                refused.code,
            )
        except (aiohttp.ClientError, OSError) as refused:
            log.warning("could not tell the user /%s failed: %s", command, type(refused).__name__)


class ShardedChatBot(ChatBot, commands.AutoShardedBot):
    """The bot running some of the shards (`shard_count`, `shard_ids` options; neither: as
    many as Discord recommends, all here), each a gateway connection of its own."""

    async def on_ready(self) -> None:
        log.info("running shard(s) %s of %s", sorted(self.shards), self.shard_count)
        await super().on_ready()

    def runs_guild(self, guild_id: int | None) -> bool:
        shard = 0 if guild_id is None else (guild_id >> 22) % (self.shard_count or 1)
        return self.shard_ids is None or shard in self.shard_ids


class DiscordUnreachable(BotError):
    def __init__(self, cause: str) -> None:
        super().__init__(f"Cannot reach Discord ({cause}); check the network and try again.")


PLAIN_FORMAT = "[{asctime}] [{levelname:<8}] {name}: {message}"
"""discord.py's own log line, without colours."""


def setup_logging(level: str, form: LogFormat = LogFormat.TEXT) -> None:
    """discord.py's own log format and handler (or JSON lines), at the configured level,
    without the start-up warnings about voice support, which this bot does not use. Colours
    only on a terminal: discord.py also colours output in any Docker container, which leaves
    escape codes in log files and journals."""
    if form is LogFormat.JSON:
        use_json_lines(level)
    else:
        handler = logging.StreamHandler()
        if handler.stream.isatty():
            discord.utils.setup_logging(
                handler=handler, level=logging.getLevelName(level), root=True
            )
        else:
            plain = logging.Formatter(PLAIN_FORMAT, "%Y-%m-%d %H:%M:%S", style="{")
            discord.utils.setup_logging(
                handler=handler, formatter=plain, level=logging.getLevelName(level), root=True
            )
        keep_payloads_out()
    logging.getLogger("discord.client").addFilter(
        lambda record: "voice will NOT be supported" not in record.getMessage()
    )


async def run_discord(bot: ChatBot, token: str, shutdown_grace: float = 0.0) -> None:
    """Run until stopped; a refused token or a missing intent ends with one clear line.
    SIGTERM (how Heroku, Docker and systemd stop a process) shuts down gracefully."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if not stopping:
            log.info("SIGTERM: stopping within %s s", shutdown_grace)
            stopping.append(asyncio.create_task(bot.shut_down(shutdown_grace)))

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        async with bot:
            await bot.start(token)
        if stopping:
            await stopping[0]
    except discord.LoginFailure:
        raise SettingsError("DISCORD_TOKEN", "was refused by Discord: check the token") from None
    except (aiohttp.ClientError, OSError) as error:
        raise DiscordUnreachable(type(error).__name__) from None
    except discord.PrivilegedIntentsRequired:
        raise SettingsError(
            "DISCORD_TOKEN",
            "belongs to a bot without the Message Content intent: switch it on in the "
            "Developer Portal (Bot -> Privileged Gateway Intents)",
        ) from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
