"""Session storage: the protocol in `base`, one module per backend, and the factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.store.base import SessionStore, StorePolicy

if TYPE_CHECKING:  # settings import the store's defaults, so not at run time
    from bot.config import Settings


def policy_from(settings: Settings) -> StorePolicy:
    return StorePolicy(
        default_model=settings.default_model,
        ttl_seconds=settings.session_ttl_seconds,
        history_cap=settings.history_cap_messages,
        history_cache_bytes=settings.history_cache_mb * 1024 * 1024,
        sessions_per_place=settings.sessions_per_place,
        message_cap_bytes=settings.message_cap_kb * 1024,
        history_cap_bytes=settings.history_cap_mb * 1024 * 1024,
    )


def open_store(settings: Settings) -> SessionStore:
    """Redis whenever `REDIS_URL` is set (the production store), else the SQLite file."""
    if settings.redis_url:
        from bot.store.redis import RedisStore

        return RedisStore.from_url(
            settings.redis_url, policy_from(settings), cluster=settings.redis_cluster
        )
    from bot.store.sqlite import SqliteStore

    return SqliteStore(settings.sqlite_path, policy_from(settings))
