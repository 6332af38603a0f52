"""Session storage: the protocol in `base`, one module per backend, and the factory."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from bot.errors import SettingsError
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
    """Redis whenever `REDIS_URL` is set (the production store), else the SQLite file. A file
    that cannot be opened is a bad `SQLITE_PATH`: one line naming it, in every mode. (Redis is
    only reached at its first call: see `bot.store.redis.RedisStore.check`.)"""
    if settings.redis_url:
        from bot.store.redis import RedisStore

        return RedisStore.from_url(
            settings.redis_url, policy_from(settings), cluster=settings.redis_cluster
        )
    from bot.store.sqlite import SqliteStore

    path = settings.sqlite_path
    if path.is_dir():
        raise SettingsError("SQLITE_PATH", f"names a folder, not a file: {path}")
    if not path.parent.is_dir():
        raise SettingsError("SQLITE_PATH", f"is in a folder that does not exist: {path.parent}")
    try:  # a write to the file and its journal, before the store builds its tables
        probe = sqlite3.connect(str(path), isolation_level=None, timeout=10)
        try:
            probe.execute("PRAGMA journal_mode=WAL")
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
        finally:
            probe.close()
    except sqlite3.OperationalError as error:  # its folder or the file is read-only
        raise SettingsError(
            "SQLITE_PATH", f"cannot be opened for writing ({error}): {path}"
        ) from None
    except sqlite3.DatabaseError:
        raise SettingsError(
            "SQLITE_PATH", f"names a file that is not an SQLite database: {path}"
        ) from None
    return SqliteStore(path, policy_from(settings), settings.sqlite_synchronous)
