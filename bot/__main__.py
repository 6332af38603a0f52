"""The composition root: `python -m bot [console | import FILE | export FILE]`.

Settings are read here, once; the store, the model client, the engine and the commands are
built here and handed down through constructors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bot.commands import Commands
from bot.config import PERSONA_NOTE, Settings, load_settings
from bot.discord_bot.scopes import scope_for
from bot.engine import Engine, EngineLimits
from bot.errors import BotError, SettingsError, StoreUnavailable
from bot.logs import LogFormat, use_json_lines
from bot.metrics import Metrics
from bot.model import ModelChoice
from bot.runtime import tune_garbage_collection
from bot.store import open_store
from bot.store.base import SessionSettings, SessionStore
from bot.transfer import OnConflict

if TYPE_CHECKING:
    from bot.model import DedalusModel

CONSOLE_SCOPE = "console"
STORE_RETRY_MAX_SECONDS = 30.0
"""The bot waits for an unreachable Redis, trying again after 1 s, 2 s, 4 s ... up to this."""
SCOPE_HELP = (
    f"whose sessions: '{CONSOLE_SCOPE}' (the default) or {scope_for(0)[:-1]}<id> for a Discord "
    "channel, thread or DM (Discord's Developer Mode, then Copy Channel ID)"
)

log = logging.getLogger("bot")


def connect_model(settings: Settings) -> DedalusModel:
    from bot.model import DedalusModel

    assert settings.dedalus_api_key is not None
    return DedalusModel.connect(
        settings.dedalus_api_key,
        settings.dedalus_base_url,
        settings.model_timeout_seconds,
        settings.model_max_retries,
    )


def build_engine(
    settings: Settings,
    store: SessionStore,
    model: DedalusModel,
    system_prompt: str,
    metrics: Metrics | None = None,
) -> Engine:
    # A summary call may take its full timeout on every try: the lease outlasts all of them.
    attempts = settings.model_max_retries + 1
    limits = EngineLimits(
        system_prompt=system_prompt,
        persona_note=PERSONA_NOTE,
        budget_bytes=settings.context_budget_chars,
        lock_ms=int(settings.turn_lease_seconds * 1000),
        message_cap_bytes=settings.message_cap_kb * 1024,
        summary_lease_ms=int((settings.model_timeout_seconds * attempts + 30) * 1000),
        models=ModelChoice(settings.allowed_models, settings.default_model),
        usage=settings.usage_limits,
        channel_context_share=settings.channel_context_share,
    )
    return Engine(store, model, limits, metrics)


def build_commands(settings: Settings, store: SessionStore, engine: Engine) -> Commands:
    return Commands(
        store, settings.allowed_models, settings.default_model, summarizer=engine.summaries
    )


async def reachable_store(settings: Settings, *, wait: bool) -> SessionStore:
    """The configured store, once it answers. An unreachable Redis is found here, not when
    users write: the bot (`wait`) logs one line naming its host and port and tries again with
    a growing pause; a tool stops with that line (exit 2). Neither shows the URL: it may hold
    a password. (A bad SQLite file stops every mode in `open_store`.)"""
    store = open_store(settings)
    variable, where = "SQLITE_PATH", str(settings.sqlite_path)
    if settings.redis_url:
        from bot.store.redis import redis_address

        variable, where = "REDIS_URL", f"Redis at {redis_address(settings.redis_url)}"
    pause = 1.0
    try:
        while True:
            try:
                await store.ping()
                if pause > 1.0:
                    log.info("storage: %s answers now", where)
                return store
            except StoreUnavailable as error:
                from bot.store.redis import failure_reason

                reason = failure_reason(error.__cause__)
                if not wait:
                    raise SettingsError(
                        variable, f"points at {where}, which cannot be used ({reason})"
                    ) from None
                log.warning(
                    "storage: %s cannot be used (%s); trying again in %g s", where, reason, pause
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORE_RETRY_MAX_SECONDS)
    except BaseException:
        await store.close()
        raise


async def run_console(settings: Settings, scope: str) -> None:
    from bot.console import Console

    store = await reachable_store(settings, wait=False)
    model = connect_model(settings)
    engine = build_engine(settings, store, model, settings.console_system_prompt)
    try:
        commands = build_commands(settings, store, engine)
        await Console(engine, commands, scope).run()
    finally:
        await engine.cancel_background()  # a summary being written hands its lease back
        await model.close()
        await store.close()


async def run_transfer(settings: Settings, args: argparse.Namespace) -> list[str]:
    from bot.transfer import EmptyScope, export_file, import_file

    store = await reachable_store(settings, wait=False)
    path, scope = args.file, args.scope
    try:
        if args.mode == "import":
            report = await import_file(
                store,
                scope,
                path,
                SessionSettings(settings.default_model),
                OnConflict(args.on_conflict),
            )
            return report.lines()
        try:
            sessions = await export_file(store, scope, path)
        except EmptyScope as empty:
            raise EmptyScope(scope, f"--scope is {SCOPE_HELP}") from empty
        return [f"Exported {len(sessions)} session(s) of scope {scope!r} to {path}."]
    finally:
        await store.close()


async def run_bot(settings: Settings) -> None:
    from aiohttp import web

    from bot.discord_bot.client import (
        ChatBot,
        ShardedChatBot,
        gateway_check,
        gateway_latencies,
        run_discord,
        setup_logging,
    )
    from bot.engine import Backfill
    from bot.health import HealthServer, store_check
    from bot.titles import ThreadTitles

    setup_logging(settings.log_level, settings.log_format)
    store = await reachable_store(settings, wait=True)
    model = connect_model(settings)
    metrics = Metrics()
    metrics.watch_store(store.stats)
    listener: web.AppRunner | None = None
    engine = build_engine(settings, store, model, settings.system_prompt, metrics)
    try:
        commands = build_commands(settings, store, engine)
        backfill = Backfill(settings.backfill_max_age_seconds, settings.backfill_max_messages)
        titles = ThreadTitles(store, model)
        shards = settings.shards
        if shards is None:
            bot = ChatBot(
                engine,
                commands,
                dev_guild_id=settings.dev_guild_id,
                backfill=backfill,
                titles=titles,
                channel_context_messages=settings.channel_context_messages,
            )
        else:
            bot = ShardedChatBot(
                engine,
                commands,
                dev_guild_id=settings.dev_guild_id,
                backfill=backfill,
                titles=titles,
                channel_context_messages=settings.channel_context_messages,
                syncs_commands=shards.runs_shard_zero,
                shard_count=shards.count,
                shard_ids=None if shards.ids is None else list(shards.ids),
            )
        assert settings.discord_token is not None
        if settings.health_port:
            metrics.watch_gauge(
                "dcbot_gateway_latency_seconds",
                "Heartbeat round trip to Discord's gateway, per shard.",
                "shard",
                lambda: gateway_latencies(bot),
            )
            checks = [("discord", gateway_check(bot)), ("store", store_check(store))]
            server = HealthServer(settings.health_host, settings.health_port, checks, metrics)
            listener = await server.start()
        await run_discord(bot, settings.discord_token, settings.shutdown_grace_seconds)
    finally:
        if listener is not None:
            await listener.cleanup()
        await engine.cancel_background()  # after any exit, SIGTERM's drain or another
        await model.close()
        await store.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bot", description="Run the Discord bot (the default) or a tool."
    )
    modes = parser.add_subparsers(dest="mode")
    console = modes.add_parser("console", help="chat in the terminal (no Discord needed)")
    console.add_argument("--scope", default=CONSOLE_SCOPE, help=SCOPE_HELP)
    for action in ("import", "export"):
        tool = modes.add_parser(action, help=f"{action} a reference-format sessions.json")
        tool.add_argument("file", type=Path)
        tool.add_argument("--scope", default=CONSOLE_SCOPE, help=SCOPE_HELP)
        if action == "import":
            tool.add_argument(
                "--on-conflict",
                choices=list(OnConflict),
                default=OnConflict.REFUSE.value,
                help="a session whose name is taken: import nothing (default), import it "
                "as 'name (2)', or replace the stored one",
            )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_garbage_collection()
    try:
        settings = load_settings()
        if args.mode == "console":
            settings.require("DEDALUS_API_KEY")
            if settings.log_format is LogFormat.JSON:
                use_json_lines("WARNING")
            else:
                logging.basicConfig(
                    level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
                )
            asyncio.run(run_console(settings, args.scope))
        elif args.mode in ("import", "export"):
            print("\n".join(asyncio.run(run_transfer(settings, args))))
        else:
            settings.require("DISCORD_TOKEN", "DEDALUS_API_KEY")
            asyncio.run(run_bot(settings))
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the console's prompt handles its own; this is mid-answer
        if args.mode == "console":
            print("\nInterrupted; an answer in progress is not kept. Goodbye!")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
