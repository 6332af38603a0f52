"""Settings: read once at start-up from the environment (and `.env`) into one frozen object.

Nothing else in the bot reads `os.environ`. A bad value raises `SettingsError` naming the
variable, which the entry point turns into one line and exit status 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from bot.context import CHANNEL_CONTEXT_MESSAGES, CHANNEL_CONTEXT_SHARE
from bot.errors import SettingsError
from bot.logs import LogFormat
from bot.store.base import HISTORY_CACHE_MB, HISTORY_CAP_MB, MESSAGE_CAP_KB, SESSIONS_PER_PLACE
from bot.store.sqlite import SYNCHRONOUS, Synchronous
from bot.usage import UsageLimits

REFERENCE_MODELS: tuple[str, ...] = (
    "openai/gpt-5.1",
    "anthropic/claude-opus-4-5-20251101",
    "google/gemini-3-pro-preview",
)
SPEAKERS_NOTE = (
    "Several people may talk to you in one conversation; each user message starts with the "
    "speaker's name in square brackets."
)
DEFAULT_SYSTEM_PROMPT = (
    f"You are a helpful assistant in a Discord chat. {SPEAKERS_NOTE} "
    "Answer concisely and use Discord markdown."
)
PERSONA_NOTE = f"(This conversation is a Discord chat. {SPEAKERS_NOTE} Discord markdown works.)"
"""Sent after a channel's persona (`/persona`), which replaces the whole system prompt: who
the model is changes, how the chat reaches it does not."""
DEFAULT_CONSOLE_SYSTEM_PROMPT = (
    "You are a helpful assistant talking with one person in a terminal. Answer concisely, "
    "in plain text or light Markdown that reads well without rendering."
)

T = TypeVar("T")


@dataclass(frozen=True)
class Shards:
    """Which of the bot's gateway shards this process runs (`SHARD_COUNT`, `SHARD_IDS`).
    Discord sends a guild's events on shard `(guild_id >> 22) % count` and DMs on shard 0, so
    processes running disjoint sets of shards answer disjoint guilds."""

    count: int | None  # None: the count Discord recommends (SHARD_COUNT=auto), all run here
    ids: tuple[int, ...] | None  # None: every shard of `count`

    @property
    def runs_shard_zero(self) -> bool:
        """Shard 0's process gets the DMs and is the one that syncs the slash commands."""
        return self.ids is None or 0 in self.ids


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the variable that sets it in the field's comment."""

    dedalus_api_key: str | None  # DEDALUS_API_KEY
    dedalus_base_url: str | None  # DEDALUS_BASE_URL
    discord_token: str | None  # DISCORD_TOKEN
    redis_url: str | None  # REDIS_URL; unset means the SQLite store
    redis_cluster: bool  # REDIS_CLUSTER: REDIS_URL names a node of a Redis Cluster
    sqlite_path: Path  # SQLITE_PATH
    sqlite_synchronous: Synchronous  # SQLITE_SYNCHRONOUS: normal or full
    default_model: str  # DEFAULT_MODEL
    allowed_models: tuple[str, ...]  # ALLOWED_MODELS, comma-separated
    system_prompt: str  # SYSTEM_PROMPT
    console_system_prompt: str  # CONSOLE_SYSTEM_PROMPT
    context_budget_tokens: int  # CONTEXT_BUDGET_TOKENS
    session_ttl_seconds: int  # SESSION_TTL_SECONDS; 0 keeps sessions forever
    history_cap_messages: int  # HISTORY_CAP_MESSAGES
    history_cache_mb: int  # HISTORY_CACHE_MB; 0 turns the cache off
    history_cap_mb: int  # HISTORY_CAP_MB: stored MB per session
    message_cap_kb: int  # MESSAGE_CAP_KB: stored KB per message
    sessions_per_place: int  # SESSIONS_PER_PLACE
    model_timeout_seconds: float  # MODEL_TIMEOUT_SECONDS
    model_max_retries: int  # MODEL_MAX_RETRIES
    turn_lease_seconds: float  # TURN_LEASE_SECONDS
    shutdown_grace_seconds: float  # SHUTDOWN_GRACE_SECONDS
    backfill_max_age_seconds: int  # BACKFILL_MAX_AGE_SECONDS; 0 answers nothing missed
    backfill_max_messages: int  # BACKFILL_MAX_MESSAGES
    user_messages_per_minute: int  # USER_MESSAGES_PER_MINUTE; 0 = no limit
    user_tokens_per_day: int  # USER_TOKENS_PER_DAY; 0 = no limit
    server_tokens_per_day: int  # SERVER_TOKENS_PER_DAY; 0 = no limit
    limits_apply_to_admins: bool  # LIMITS_APPLY_TO_ADMINS
    channel_context_messages: int  # CHANNEL_CONTEXT_MESSAGES; 0 sends none
    channel_context_share: float  # CHANNEL_CONTEXT_SHARE: of the context budget
    dev_guild_id: int | None  # DISCORD_DEV_GUILD_ID
    log_level: str  # LOG_LEVEL
    log_format: LogFormat  # LOG_FORMAT: text (for people) or json (one object per line)
    health_host: str  # HEALTH_HOST: the address /healthz and /metrics listen on
    health_port: int  # HEALTH_PORT; 0 (the default) turns the listener off
    shards: Shards | None = None  # SHARD_COUNT, SHARD_IDS; None: one connection, unsharded

    @property
    def usage_limits(self) -> UsageLimits:
        return UsageLimits(
            messages_per_minute=self.user_messages_per_minute,
            user_tokens_per_day=self.user_tokens_per_day,
            server_tokens_per_day=self.server_tokens_per_day,
            apply_to_admins=self.limits_apply_to_admins,
        )

    @property
    def context_budget_chars(self) -> int:
        """The budget in stored characters: about four characters make a token."""
        return self.context_budget_tokens * 4

    def require(self, *names: str) -> None:
        """Fail unless the secrets a mode needs are set; the console needs no Discord token."""
        for name in names:
            if not getattr(self, name.lower()):
                raise SettingsError(name, "is not set; put it in .env or the environment")


def _text(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name, "").strip()
    return value or default


def _parsed(
    env: Mapping[str, str],
    name: str,
    default: T,
    parse: Callable[[str], T],
    expected: str,
    *,
    secret: bool = False,
) -> T:
    """The parsed value, or `default` when unset. A `secret` value (a URL may carry a
    password) is never repeated in the error, which is printed and may reach a log."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        shown = "" if secret else f", got {raw[:40]!r}"
        raise SettingsError(name, f"must be {expected}{shown}") from None


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(raw)
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(raw)
    return value


def _up_to_100(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 100:
        raise ValueError(raw)
    return value


def _up_to_100_or_0(raw: str) -> int:
    return 0 if int(raw) == 0 else _up_to_100(raw)


def _share(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError(raw)
    return value


def _lease_seconds(raw: str) -> float:
    value = float(raw)
    if not 1 <= value <= 600:
        raise ValueError(raw)
    return value


def _model_list(raw: str) -> tuple[str, ...]:
    models = tuple(dict.fromkeys(m.strip() for m in raw.split(",") if m.strip()))
    if not models or any(len(m) > 100 or any(c.isspace() for c in m) for m in models):
        raise ValueError(raw)
    return models


def _redis_url(raw: str) -> str:
    """Checked with redis-py's own parser, so a URL it would refuse at connection time (a bad
    port, an unclosed IPv6 bracket) stops start-up here with one line, not a traceback."""
    from redis.connection import parse_url

    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("scheme")
    parse_url(raw)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    return raw


def _cluster_url(url: str) -> bool:
    """A cluster has one database, 0, and no Unix sockets (redis-py refuses both there)."""
    parts = urlsplit(url)
    return parts.scheme in ("redis", "rediss") and parts.path.strip("/") in ("", "0")


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("scheme or host")
    _ = parts.port  # raises ValueError for a port that is not a number in range
    return raw


def _yes_or_no(raw: str) -> bool:
    answers = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if raw.lower() not in answers:
        raise ValueError(raw)
    return answers[raw.lower()]


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


def _shard_ranges(raw: str) -> list[tuple[int, int]]:
    """`0-3,6` -> [(0, 3), (6, 6)]: inclusive ranges of shard ids."""
    ranges: list[tuple[int, int]] = []
    for part in raw.split(","):
        low, dash, high = part.strip().partition("-")
        first, last = int(low), int(high if dash else low)
        if first < 0 or last < first:
            raise ValueError(part)
        ranges.append((first, last))
    return ranges


def _shards(env: Mapping[str, str]) -> Shards | None:
    count_raw = env.get("SHARD_COUNT", "").strip().lower()
    ids_set = bool(env.get("SHARD_IDS", "").strip())
    if not count_raw:
        if ids_set:
            raise SettingsError("SHARD_IDS", "needs SHARD_COUNT, the total number of shards")
        return None
    if count_raw == "auto":
        if ids_set:
            raise SettingsError("SHARD_IDS", "needs a number in SHARD_COUNT, not auto")
        return Shards(None, None)
    count = _parsed(env, "SHARD_COUNT", 1, _positive_int, "a positive whole number or auto")
    ranges = _parsed(
        env, "SHARD_IDS", None, _shard_ranges, "shard ids like 0-3 or 0,2 (from 0, ascending)"
    )
    if ranges is None:
        return Shards(count, None)
    highest = max(last for _, last in ranges)
    if highest >= count:
        raise SettingsError(
            "SHARD_IDS",
            f"names shard {highest}, but SHARD_COUNT={count} has shards 0 to {count - 1}",
        )
    ids = sorted({i for first, last in ranges for i in range(first, last + 1)})
    return Shards(count, tuple(ids))


def _boolean(raw: str) -> bool:
    value = raw.lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(raw)
    return value in {"true", "1", "yes"}


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(raw)
    return level


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from `env`, or from the process environment after loading `.env`."""
    if env is None:
        from dotenv import find_dotenv, load_dotenv

        load_dotenv(find_dotenv(usecwd=True))  # the .env of the directory the bot runs in
        env = os.environ
    allowed = _parsed(
        env, "ALLOWED_MODELS", REFERENCE_MODELS, _model_list, "a comma-separated model list"
    )
    default_model = _text(env, "DEFAULT_MODEL", allowed[0]) or allowed[0]
    if default_model not in allowed:
        raise SettingsError("DEFAULT_MODEL", f"{default_model!r} is not in ALLOWED_MODELS")
    redis_url = _parsed(env, "REDIS_URL", None, _redis_url, "a redis:// URL", secret=True)
    redis_cluster = _parsed(env, "REDIS_CLUSTER", False, _yes_or_no, "true or false")
    if redis_cluster and redis_url and not _cluster_url(redis_url):
        raise SettingsError(
            "REDIS_URL",
            "must name a cluster node as redis://host:port (database 0) with REDIS_CLUSTER",
        )
    history_cap_mb = _parsed(
        env, "HISTORY_CAP_MB", HISTORY_CAP_MB, _positive_int, "a positive whole number"
    )
    message_cap_kb = _parsed(
        env, "MESSAGE_CAP_KB", MESSAGE_CAP_KB, _positive_int, "a positive whole number"
    )
    if message_cap_kb > history_cap_mb * 1024:
        raise SettingsError(
            "MESSAGE_CAP_KB", "is larger than HISTORY_CAP_MB; a session must hold a message"
        )
    return Settings(
        dedalus_api_key=_text(env, "DEDALUS_API_KEY", None),
        dedalus_base_url=_parsed(
            env, "DEDALUS_BASE_URL", None, _http_url, "an http(s) URL", secret=True
        ),
        discord_token=_text(env, "DISCORD_TOKEN", None),
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        sqlite_path=Path(_text(env, "SQLITE_PATH", "sessions.sqlite3") or "sessions.sqlite3"),
        sqlite_synchronous=_parsed(
            env,
            "SQLITE_SYNCHRONOUS",
            SYNCHRONOUS,
            lambda raw: Synchronous(raw.lower()),
            "normal or full",
        ),
        default_model=default_model,
        allowed_models=allowed,
        system_prompt=_text(env, "SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT) or DEFAULT_SYSTEM_PROMPT,
        console_system_prompt=_text(env, "CONSOLE_SYSTEM_PROMPT", None)
        or DEFAULT_CONSOLE_SYSTEM_PROMPT,
        context_budget_tokens=_parsed(
            env, "CONTEXT_BUDGET_TOKENS", 16000, _positive_int, "a positive whole number"
        ),
        session_ttl_seconds=_parsed(
            env, "SESSION_TTL_SECONDS", 0, _non_negative_int, "a whole number of seconds >= 0"
        ),
        history_cap_messages=_parsed(
            env, "HISTORY_CAP_MESSAGES", 2000, _positive_int, "a positive whole number"
        ),
        history_cache_mb=_parsed(
            env, "HISTORY_CACHE_MB", HISTORY_CACHE_MB, _non_negative_int, "a whole number >= 0"
        ),
        history_cap_mb=history_cap_mb,
        message_cap_kb=message_cap_kb,
        sessions_per_place=_parsed(
            env, "SESSIONS_PER_PLACE", SESSIONS_PER_PLACE, _positive_int, "a positive whole number"
        ),
        model_timeout_seconds=_parsed(
            env, "MODEL_TIMEOUT_SECONDS", 120.0, _positive_float, "a positive number of seconds"
        ),
        model_max_retries=_parsed(
            env, "MODEL_MAX_RETRIES", 2, _non_negative_int, "a whole number >= 0"
        ),
        turn_lease_seconds=_parsed(
            env, "TURN_LEASE_SECONDS", 15.0, _lease_seconds, "a number of seconds from 1 to 600"
        ),
        shutdown_grace_seconds=_parsed(
            env, "SHUTDOWN_GRACE_SECONDS", 20.0, _non_negative_float, "a number of seconds >= 0"
        ),
        backfill_max_age_seconds=_parsed(
            env, "BACKFILL_MAX_AGE_SECONDS", 600, _non_negative_int, "whole seconds >= 0"
        ),
        backfill_max_messages=_parsed(
            env, "BACKFILL_MAX_MESSAGES", 20, _up_to_100, "a whole number from 1 to 100"
        ),
        user_messages_per_minute=_parsed(
            env, "USER_MESSAGES_PER_MINUTE", 0, _non_negative_int, "a whole number >= 0"
        ),
        user_tokens_per_day=_parsed(
            env, "USER_TOKENS_PER_DAY", 0, _non_negative_int, "a whole number >= 0"
        ),
        server_tokens_per_day=_parsed(
            env, "SERVER_TOKENS_PER_DAY", 0, _non_negative_int, "a whole number >= 0"
        ),
        limits_apply_to_admins=_parsed(
            env, "LIMITS_APPLY_TO_ADMINS", False, _boolean, "true or false"
        ),
        channel_context_messages=_parsed(
            env,
            "CHANNEL_CONTEXT_MESSAGES",
            CHANNEL_CONTEXT_MESSAGES,
            _up_to_100_or_0,
            "a whole number from 0 to 100",
        ),
        channel_context_share=_parsed(
            env,
            "CHANNEL_CONTEXT_SHARE",
            CHANNEL_CONTEXT_SHARE,
            _share,
            "a fraction above 0, at most 1 (such as 0.25)",
        ),
        dev_guild_id=_parsed(env, "DISCORD_DEV_GUILD_ID", None, _positive_int, "a guild ID"),
        log_level=_parsed(env, "LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
        health_host=env.get("HEALTH_HOST", "").strip() or "127.0.0.1",
        health_port=_parsed(env, "HEALTH_PORT", 0, _port, "a port number from 0 to 65535"),
        log_format=_parsed(
            env, "LOG_FORMAT", LogFormat.TEXT, lambda raw: LogFormat(raw.lower()), "text or json"
        ),
        shards=_shards(env),
    )
