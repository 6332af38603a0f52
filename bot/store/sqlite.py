"""The embedded store: sessions in one SQLite file, so the bot runs with nothing else installed.

Each operation is one transaction (`BEGIN IMMEDIATE`, so two processes on one file
serialize); the turn lock is a token and expiry on the session's row, as in Redis. sqlite3
blocks, so every call runs in a worker thread, one at a time. A turn is two transactions:
`begin_turn` (claim, queue, lock and history in one) and `finish_turn` (the save, the
answered claim and the unlock in one); only the second may wait for the disk
(`Synchronous`).

With a TTL, a session not used for that long (a turn, /new, /load, an import) goes with its
messages; a place's current-session row and options go once it has no session left and its
options were not set for that long; lapsed claims and queue places go too. Each call purges,
at most once a minute (or twice per TTL when that is shorter).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from bot.errors import (
    CorruptSession,
    DamagedState,
    InvalidInput,
    SessionBusy,
    SessionLimit,
    StoreUnavailable,
    SummaryInProgress,
    UnknownSession,
)
from bot.store import sqlite_usage
from bot.store.base import (
    CLAIM_ANSWERED,
    DEFAULT_SESSION,
    DELETED_TTL_SECONDS,
    FORGOTTEN_TTL_SECONDS,
    LAST_ANSWERED_OPTION,
    PERSONA_OPTION,
    PLACES_KEPT,
    PLACES_KEPT_SECONDS,
    STORE_FORMAT,
    TICKET_TTL_MS,
    AlreadyClaimed,
    Exchange,
    Message,
    NotedPlace,
    SessionCleared,
    SessionInfo,
    SessionSettings,
    StorePolicy,
    StoreStats,
    Summary,
    SummarySource,
    Ticket,
    Turn,
    answer_record,
    answered_id,
    claim_lease,
    decode_messages,
    exchange_from,
    is_user_message,
    listed_sessions,
    mcp_json,
    readable_name,
    session_info,
    shown_name,
    stored_bytes,
    stored_name,
)
from bot.usage import Admission, Charge, Refusal, ServerUsage, SessionUsage

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scopes (scope TEXT PRIMARY KEY, current TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scope_options (
    scope TEXT NOT NULL, option TEXT NOT NULL, value TEXT NOT NULL,
    updated REAL NOT NULL DEFAULT 0, PRIMARY KEY (scope, option));
CREATE TABLE IF NOT EXISTS sessions (
    scope TEXT NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL, mcp TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, format TEXT NOT NULL,
    lock_token TEXT, lock_expires REAL NOT NULL DEFAULT 0, last_turn TEXT,
    epoch TEXT NOT NULL DEFAULT '', summary TEXT, summary_upto INTEGER,
    summary_covered INTEGER NOT NULL DEFAULT 0, summary_lease TEXT,
    summary_lease_expires REAL NOT NULL DEFAULT 0, PRIMARY KEY (scope, name));
CREATE INDEX IF NOT EXISTS sessions_by_updated ON sessions (updated);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL, name TEXT NOT NULL,
    body TEXT NOT NULL, ref TEXT, size INTEGER, answer_record TEXT);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (scope, name, id);
CREATE INDEX IF NOT EXISTS messages_by_ref ON messages (scope, ref) WHERE ref IS NOT NULL;
CREATE TABLE IF NOT EXISTS claims (
    scope TEXT NOT NULL, claim TEXT NOT NULL, token TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (scope, claim));
CREATE TABLE IF NOT EXISTS places (scope TEXT PRIMARY KEY, noted REAL NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    scope TEXT NOT NULL, place TEXT NOT NULL, deadline REAL NOT NULL,
    PRIMARY KEY (scope, place));
CREATE TABLE IF NOT EXISTS forgotten (
    scope TEXT NOT NULL, ref TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (scope, ref));
CREATE TABLE IF NOT EXISTS deleted_epochs (
    scope TEXT NOT NULL, epoch TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (scope, epoch));
"""

_SUMMARY = """
SELECT s.name, s.format, s.model, s.mcp, s.created, s.updated,
       (SELECT count(*) FROM messages m WHERE m.scope = s.scope AND m.name = s.name)
FROM sessions s WHERE s.scope = ?"""

_TURN_PLACE = """
SELECT c.current, s.lock_expires, s.epoch, s.summary, s.summary_upto, s.summary_covered,
       s.name, s.format, s.model, s.mcp, s.created, s.updated,
       (SELECT count(*) FROM messages m WHERE m.scope = s.scope AND m.name = s.name),
       (SELECT value FROM scope_options o WHERE o.scope = ?1 AND o.option = ?3),
       (SELECT value FROM scope_options o WHERE o.scope = ?1 AND o.option = ?4)
FROM (SELECT ?1 AS scope) q
LEFT JOIN scopes c ON c.scope = q.scope
LEFT JOIN sessions s ON s.scope = q.scope AND s.name = coalesce(c.current, ?2)"""
"""What a turn reads of its place in one statement: the current session's name; that
session's lock, epoch and summary, then `_SUMMARY`'s row (NULLs when it has no row); and
the place's persona and last answered message. ?1: the scope, ?2: `DEFAULT_SESSION`, ?3:
`PERSONA_OPTION`, ?4: `LAST_ANSWERED_OPTION`."""

_PURGE_EVERY_SECONDS = 60.0
_SUMMARY_COLUMNS = {
    "summary": "TEXT",
    "summary_upto": "INTEGER",
    "summary_covered": "INTEGER NOT NULL DEFAULT 0",
    "summary_lease": "TEXT",
    "summary_lease_expires": "REAL NOT NULL DEFAULT 0",
}
_NO_SUMMARY = "summary = NULL, summary_upto = NULL, summary_covered = 0"


def _summary_of(text: object, upto: object, covered: object) -> Summary | None:
    """A stored summary; None when none is stored (or what is stored is not one)."""
    if not isinstance(text, str) or not isinstance(upto, int):
        return None
    return Summary(text, covered if isinstance(covered, int) else 0, upto)


def _turn_row(db: sqlite3.Connection, scope: str, name: str) -> tuple[Any, ...] | None:
    """What a turn's save checks before writing: (lock_token, lock_expires, last_turn,
    epoch) of its session, None when the session is gone."""
    row: tuple[Any, ...] | None = db.execute(
        "SELECT lock_token, lock_expires, last_turn, epoch FROM sessions"
        " WHERE scope = ? AND name = ?",
        (scope, name),
    ).fetchone()
    return row


def _number(value: object) -> float:
    """A stored expiry as a number; junk (text where a number belongs) counts as lapsed."""
    return float(value) if isinstance(value, int | float) else 0.0


def _current_of(stored: object) -> str | None:
    """A place's stored current-session name (None: none yet); `DamagedState` when it is junk
    (`/clear` and `/new` replace it)."""
    if stored is None:
        return None
    if not readable_name(stored):
        raise DamagedState("its current session name is unreadable")
    return str(stored)


def _epoch() -> str:
    """A new history identity for a session (see `Turn.epoch`)."""
    return uuid.uuid4().hex


def _position(db: sqlite3.Connection, scope: str, name: str) -> int:
    """The session's newest message id (ids only grow): its `Turn.sequence`."""
    row = db.execute(
        "SELECT max(id) FROM messages WHERE scope = ? AND name = ?", (scope, name)
    ).fetchone()
    return int(row[0] or 0)


class Synchronous(StrEnum):
    """`SQLITE_SYNCHRONOUS`: whether the commit of a turn or a command waits for the disk,
    named after the `PRAGMA synchronous` level it sets. In WAL mode neither level can
    corrupt the file, and a crash of the process loses nothing (a commit is in the
    operating system's hands either way); they differ on a power failure or a crash of the
    operating system, which `normal` lets take the last commits the system had not yet
    written back (what each costs is in the README's settings table). Deletions users ask
    for always wait; the bookkeeping of turns in progress never does (see `_run`)."""

    FULL = "full"
    NORMAL = "normal"


SYNCHRONOUS = Synchronous.NORMAL
"""The default, as most embedded uses of SQLite in WAL mode choose: an fsync per turn adds
about half to a turn's time on this store (measured on an SSD-backed machine)."""


class SqliteStore:
    def __init__(
        self, path: Path | str, policy: StorePolicy, synchronous: Synchronous = SYNCHRONOUS
    ) -> None:
        self._policy = policy
        self._synchronous = Synchronous(synchronous)
        self.stats = StoreStats()
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=10
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")  # what is deleted leaves the file too
        self._db.executescript(_SCHEMA)
        self._db.executescript(sqlite_usage.SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        if "last_turn" not in columns:  # a file from before turns were idempotent
            self._db.execute("ALTER TABLE sessions ADD COLUMN last_turn TEXT")
        if "epoch" not in columns:  # a file from before turns were fenced
            self._db.execute("ALTER TABLE sessions ADD COLUMN epoch TEXT NOT NULL DEFAULT ''")
        for column, declared in _SUMMARY_COLUMNS.items():  # a file from before summaries
            if column not in columns:
                self._db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {declared}")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
        if "size" not in columns:  # a file from before sessions had a size cap
            self._db.execute("ALTER TABLE messages ADD COLUMN size INTEGER")
            self._db.execute("UPDATE messages SET size = length(CAST(body AS BLOB))")
        if "answer_record" not in columns:  # a file from before /retry and /undo
            self._db.execute("ALTER TABLE messages ADD COLUMN answer_record TEXT")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(places)")}
        if "server" not in columns:  # a file from before places recorded their server
            self._db.execute("ALTER TABLE places ADD COLUMN server TEXT")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(scope_options)")}
        if "updated" not in columns:
            self._db.execute("ALTER TABLE scope_options ADD COLUMN updated REAL NOT NULL DEFAULT 0")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS messages_sizes ON messages (scope, name, id, size)"
        )
        self._level = ""  # the PRAGMA synchronous level set last (see `_run`)
        self._thread_lock = threading.Lock()
        self._last_purge = 0.0

    async def close(self) -> None:
        def close() -> None:
            with self._thread_lock:  # a call still running (a background summary) ends first
                self._db.close()

        await asyncio.to_thread(close)

    async def _run(
        self, work: Callable[[sqlite3.Connection], T], *, synced: bool | None = None
    ) -> T:
        """Run `work` in one write transaction, in a worker thread. Whether its commit waits
        for the disk (see `Synchronous`): by default, as `SQLITE_SYNCHRONOUS` says, for what
        users store and change; `synced=True` always, for a deletion a user asked for (it is
        on disk when they are told it is done); `synced=False` never, for the bookkeeping of
        turns in progress (a lock, a lease, a place in the queue), which means nothing once
        the machine is down, and the counts a turn makes before its save (rates, tokens).
        A commit that waits takes every earlier one to disk too."""
        if synced is None:
            synced = self._synchronous is Synchronous.FULL
        level = "FULL" if synced else "NORMAL"

        def transaction() -> T:
            with self._thread_lock:
                db = self._db
                if level != self._level:  # a setting of the connection, read at each commit
                    db.execute(f"PRAGMA synchronous = {level}")
                    self._level = level
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._purge_idle(db)
                    result = work(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result

        try:
            return await asyncio.to_thread(transaction)
        except sqlite3.OperationalError as error:
            self.stats.unavailable += 1
            raise StoreUnavailable() from error

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    # Helpers that run inside a transaction.

    def _current_name(self, db: sqlite3.Connection, scope: str) -> str | None:
        row = db.execute("SELECT current FROM scopes WHERE scope = ?", (scope,)).fetchone()
        return None if row is None else _current_of(row[0])

    def _summary_row_exists(self, db: sqlite3.Connection, scope: str, name: str) -> bool:
        found = db.execute("SELECT 1 FROM sessions WHERE scope = ? AND name = ?", (scope, name))
        return found.fetchone() is not None

    def _summary(self, db: sqlite3.Connection, scope: str, name: str) -> SessionInfo | None:
        row = db.execute(_SUMMARY + " AND s.name = ?", (scope, name)).fetchone()
        return None if row is None else session_info(row)

    def _insert(
        self, db: sqlite3.Connection, scope: str, name: str, settings: SessionSettings
    ) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO sessions (scope, name, model, mcp, created, updated, format, epoch)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (scope, name, settings.model, mcp_json(settings), now, now, STORE_FORMAT, _epoch()),
        )

    def _set_current(self, db: sqlite3.Connection, scope: str, name: str) -> None:
        db.execute(
            "INSERT INTO scopes (scope, current) VALUES (?, ?)"
            " ON CONFLICT (scope) DO UPDATE SET current = excluded.current",
            (scope, name),
        )

    def _current_or_create(self, db: sqlite3.Connection, scope: str) -> str:
        name = self._current_name(db, scope)
        if name is None:
            name = DEFAULT_SESSION
            self._set_current(db, scope, name)
        exists = db.execute(
            "SELECT 1 FROM sessions WHERE scope = ? AND name = ?", (scope, name)
        ).fetchone()
        if exists is None:
            self._insert(db, scope, name, SessionSettings(self._policy.default_model))
        return name

    def _purge_idle(self, db: sqlite3.Connection) -> None:
        """Drop what the TTL has expired (see the module's docstring); at most once a minute,
        or twice per TTL when that is shorter."""
        now = time.time()
        ttl = self._policy.ttl_seconds
        every = min(_PURGE_EVERY_SECONDS, ttl / 2) if ttl else _PURGE_EVERY_SECONDS
        if now - self._last_purge < every:
            return
        self._last_purge = now
        db.execute("DELETE FROM claims WHERE expires < ?", (now,))
        db.execute(  # a deadline that is not a number is junk: it lapses too
            "DELETE FROM queue WHERE deadline < ? OR typeof(deadline) NOT IN ('integer', 'real')",
            (now,),
        )
        db.execute("DELETE FROM deleted_epochs WHERE expires < ?", (now,))
        sqlite_usage.purge(db, now, sessions_expire=False)
        if not ttl:
            return
        cutoff = now - ttl
        db.execute(
            "DELETE FROM messages WHERE (scope, name) IN"
            " (SELECT scope, name FROM sessions WHERE updated < ?)",
            (cutoff,),
        )
        db.execute("DELETE FROM sessions WHERE updated < ?", (cutoff,))
        db.execute(
            "DELETE FROM scope_options WHERE updated < ?"
            " AND scope NOT IN (SELECT scope FROM sessions)",
            (cutoff,),
        )
        db.execute(
            "DELETE FROM scopes WHERE scope NOT IN (SELECT scope FROM sessions)"
            " AND scope NOT IN (SELECT scope FROM scope_options)"
        )
        sqlite_usage.purge(db, now, sessions_expire=True)

    def _trim_to_bytes(
        self, db: sqlite3.Connection, scope: str, name: str, at_most: int | None = None
    ) -> None:
        """Drop the oldest messages beyond the session's byte cap (the newest always fits).
        `at_most`: what the session can hold at most, when known; within the cap, the sum
        (a scan of the session's sizes) is skipped."""
        cap = self._policy.history_cap_bytes
        if at_most is not None and at_most <= cap:
            return
        (total,) = db.execute(
            "SELECT coalesce(sum(size), 0) FROM messages WHERE scope = ? AND name = ?",
            (scope, name),
        ).fetchone()
        if total <= cap:
            return
        db.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM (SELECT id, sum(size) OVER"
            " (ORDER BY id DESC) AS newer FROM messages WHERE scope = ? AND name = ?)"
            " WHERE newer > ?)",
            (scope, name, cap),
        )

    def _live_sessions(self, db: sqlite3.Connection, scope: str) -> set[str]:
        """The scope's sessions not idle past the TTL (the purge may not have run yet)."""
        ttl = self._policy.ttl_seconds
        cutoff = time.time() - ttl if ttl else float("-inf")
        rows = db.execute(
            "SELECT name FROM sessions WHERE scope = ? AND updated >= ?", (scope, cutoff)
        )
        return {str(row[0]) for row in rows}

    # The store protocol.

    async def begin_turn(self, scope: str, ticket: Ticket, budget_bytes: int, lock_ms: int) -> Turn:
        token = ticket.token

        def work(
            db: sqlite3.Connection,
        ) -> (
            tuple[
                SessionInfo,
                list[str],
                int,
                str,
                int,
                str | None,
                Summary | None,
                int | None,
                int | None,
            ]
            | Exception
        ):
            """Returns the refusal instead of raising it, so the claim and the place in
            the queue are committed even when the turn must wait. A turn nobody is ahead of
            takes the lock without ever entering the queue."""
            now = time.time()
            place = ticket.place
            if ticket.claim is not None:
                refused = self._take_claim(db, scope, ticket.claim, token, lock_ms)
                if refused is not None:
                    return refused
            first = db.execute(  # lapsed places do not count (the purge removes them)
                "SELECT place FROM queue WHERE scope = ? AND place <= ? AND deadline >= ?"
                " AND typeof(deadline) IN ('integer', 'real') ORDER BY place LIMIT 1",
                (scope, place, now),
            ).fetchone()
            queued = first is not None and first[0] == place
            if first is not None and not queued:
                return self._wait(db, scope, place, now)
            found = (scope, DEFAULT_SESSION, PERSONA_OPTION, LAST_ANSWERED_OPTION)
            current, *row, persona, last = db.execute(_TURN_PLACE, found).fetchone()
            try:
                name = _current_of(current)
            except DamagedState as damaged:
                return self._refuse(db, scope, ticket, queued, damaged)
            if name is None:  # the place's first turn
                name = DEFAULT_SESSION
                self._set_current(db, scope, name)
            if row[5] is None:  # its current session has no row yet
                self._insert(db, scope, name, SessionSettings(self._policy.default_model))
                current, *row, persona, last = db.execute(_TURN_PLACE, found).fetchone()
            expires, epoch, summary_text, upto, covered, *summarized = row
            if summarized[1] != STORE_FORMAT:
                return self._refuse(db, scope, ticket, queued, CorruptSession(shown_name(name)))
            if _number(expires) > now:
                return self._wait(db, scope, place, now)
            if queued:
                db.execute("DELETE FROM queue WHERE scope = ? AND place = ?", (scope, place))
            db.execute(
                "UPDATE sessions SET lock_token = ?, lock_expires = ? WHERE scope = ? AND name = ?",
                (token, now + lock_ms / 1000, scope, name),
            )
            session = session_info(summarized)
            recent: list[str] = []
            used = position = 0
            for i, body, size in db.execute(
                "SELECT id, body, length(CAST(body AS BLOB)) FROM messages"
                " WHERE scope = ? AND name = ? ORDER BY id DESC",
                (scope, name),
            ):
                position = position or int(i)  # the newest id: the session's position
                if used + size > budget_bytes:
                    break
                used += size
                recent.append(body)
            summary = _summary_of(summary_text, upto, covered)
            pending = None
            if summary is not None:
                (pending,) = db.execute(
                    "SELECT count(*) FROM messages WHERE scope = ? AND name = ? AND id > ?",
                    (scope, name, summary.upto),
                ).fetchone()
            persona = None if persona is None else str(persona)
            last_answered = answered_id(None if last is None else str(last))
            return (
                session,
                recent[::-1],
                used,
                epoch,
                position,
                persona,
                summary,
                pending,
                last_answered,
            )

        outcome = await self._run(work, synced=False)
        if isinstance(outcome, Exception):
            raise outcome
        session, bodies, used, epoch, position, persona, summary, pending, last = outcome
        turn = Turn(
            scope,
            session,
            [],
            used,
            token,
            claim=ticket.claim,
            epoch=epoch,
            sequence=position,
            persona=persona,
            summary=summary,
            pending=pending,
            last_answered=last,
        )
        try:
            recent = decode_messages(session.name, bodies)
        except CorruptSession:
            await self.finish_turn(turn, [])
            raise
        return replace(turn, recent=recent)

    @staticmethod
    def _wait(db: sqlite3.Connection, scope: str, place: str, now: float) -> SessionBusy:
        """Take (or keep) the turn's place in the queue: a turn behind it waits for it."""
        db.execute(
            "INSERT INTO queue (scope, place, deadline) VALUES (?, ?, ?)"
            " ON CONFLICT (scope, place) DO UPDATE SET deadline = excluded.deadline",
            (scope, place, now + TICKET_TTL_MS / 1000),
        )
        return SessionBusy()

    def _refuse(
        self, db: sqlite3.Connection, scope: str, ticket: Ticket, queued: bool, error: Exception
    ) -> Exception:
        """A turn that cannot begin, for good: its place goes, its message counts as answered."""
        if queued:
            db.execute("DELETE FROM queue WHERE scope = ? AND place = ?", (scope, ticket.place))
        if ticket.claim is not None:
            self._settle(db, scope, ticket.claim, ticket.token, answered=True)
        return error

    def _take_claim(
        self, db: sqlite3.Connection, scope: str, claim: str, token: str, lease_ms: int
    ) -> AlreadyClaimed | None:
        """Take or renew this token's lease on `claim`; the refusal when another has it. A
        lapsed lease, or junk (an expiry not a number, a holder neither lease nor answer),
        is taken over."""
        now = time.time()
        row = db.execute(
            "SELECT token, expires FROM claims WHERE scope = ? AND claim = ?", (scope, claim)
        ).fetchone()
        mine = claim_lease(token)
        if row is not None and row[0] != mine:
            holder, expires = row
            junk = not isinstance(expires, int | float) or not (
                holder == CLAIM_ANSWERED
                or (isinstance(holder, str) and holder.startswith(claim_lease("")))
            )
            if not junk and expires >= now:
                return AlreadyClaimed(answered=not holder.startswith(claim_lease("")))
        db.execute(
            "INSERT INTO claims (scope, claim, token, expires) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (scope, claim) DO UPDATE SET token = excluded.token,"
            " expires = excluded.expires",
            (scope, claim, mine, now + lease_ms / 1000),
        )
        return None

    def _settle(
        self, db: sqlite3.Connection, scope: str, claim: str, token: str, *, answered: bool
    ) -> None:
        """End this token's lease on `claim`, if it still holds it (see `settle_claim`)."""
        key = (scope, claim, claim_lease(token))
        if not answered:
            db.execute("DELETE FROM claims WHERE scope = ? AND claim = ? AND token = ?", key)
            return
        cursor = db.execute(
            "UPDATE claims SET token = ?, expires = ? WHERE scope = ? AND claim = ? AND token = ?",
            (CLAIM_ANSWERED, time.time() + self._policy.claim_seconds, *key),
        )
        if cursor.rowcount == 0:
            return
        db.execute(  # the newest message answered, compared as `claim_order` does
            "INSERT INTO scope_options (scope, option, value, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (scope, option) DO UPDATE SET value = excluded.value,"
            " updated = excluded.updated WHERE (length(excluded.value), excluded.value)"
            " > (length(CAST(value AS TEXT)), CAST(value AS TEXT))",
            (scope, LAST_ANSWERED_OPTION, claim, time.time()),
        )

    async def claim(self, scope: str, claim: str, token: str, lease_ms: int) -> None:
        refused = await self._run(
            lambda db: self._take_claim(db, scope, claim, token, lease_ms), synced=False
        )
        if refused is not None:
            raise refused

    async def settle_claim(self, scope: str, claim: str, token: str, *, answered: bool) -> None:
        await self._run(  # a message answered stays answered; a lease handed back is bookkeeping
            lambda db: self._settle(db, scope, claim, token, answered=answered),
            synced=None if answered else False,
        )

    async def note_place(self, scope: str, server: str | None = None) -> None:
        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "INSERT INTO places (scope, noted, server) VALUES (?, ?, ?)"
                " ON CONFLICT (scope) DO UPDATE SET noted = excluded.noted,"
                " server = coalesce(excluded.server, server)",
                (scope, now, server),
            )
            db.execute(
                "DELETE FROM places WHERE noted < ? OR scope NOT IN"
                " (SELECT scope FROM places ORDER BY noted DESC LIMIT ?)",
                (now - PLACES_KEPT_SECONDS, PLACES_KEPT),
            )

        await self._run(work, synced=False)

    async def recent_places(self) -> list[NotedPlace]:
        def work(db: sqlite3.Connection) -> list[NotedPlace]:
            since = time.time() - PLACES_KEPT_SECONDS
            rows = db.execute(
                "SELECT scope, server FROM places WHERE noted >= ? ORDER BY noted DESC", (since,)
            ).fetchall()
            return [NotedPlace(str(scope), server) for scope, server in rows]

        return await self._run(work)

    async def finish_turn(
        self,
        turn: Turn,
        added: Sequence[Message],
        user_ref: str | None = None,
        usage: Charge | None = None,
        encoded: Sequence[str] | None = None,
    ) -> bool:
        scope, name = turn.scope, stored_name(turn.session.name)
        bodies = self._policy.check_sizes(added, encoded=encoded)

        def work(db: sqlite3.Connection) -> bool | SessionCleared:
            if turn.claim is not None:
                self._settle(db, scope, turn.claim, turn.lock_token, answered=True)
            row = _turn_row(db, scope, name)
            now = time.time()
            if row is not None and row[2] == turn.lock_token:
                return True  # saved already (and charged): this call repeats one
            if usage is not None:  # in this transaction: a failed call charged nothing
                sqlite_usage.record_session(db, usage)
            if bodies and (row is None or row[3] != turn.epoch) and self._epoch_deleted(db, turn):
                return SessionCleared()  # its session was deleted: nothing of it comes back
            if row is None or (row[0] != turn.lock_token and _number(row[1]) > now):
                return False
            held = row[0] == turn.lock_token and _number(row[1]) > now
            if bodies and user_ref is not None and self._deleted(db, scope, user_ref, now):
                self._unlock(db, scope, name)  # its author deleted it meanwhile: keep neither
                return True
            if bodies and row[3] != turn.epoch:  # cleared or replaced during the turn
                if not held:
                    return False
                self._unlock(db, scope, name)
                return SessionCleared()
            if (
                bodies
                and not held
                and (
                    self._current_name(db, scope) != name
                    or _position(db, scope, name) != turn.sequence
                )
            ):
                return False  # the lock lapsed and the session moved on: this work is stale
            if bodies:
                refs = [user_ref] + [None] * (len(bodies) - 1)
                rows = [
                    (scope, name, body, ref, stored_bytes(body))
                    for body, ref in zip(bodies, refs, strict=True)
                ]
                db.executemany(
                    "INSERT INTO messages (scope, name, body, ref, size) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                # The turn loaded the whole session (nothing else adds to it while the turn
                # holds it, or saves when it moved on): its size is known without a scan.
                whole = len(turn.recent) >= turn.session.message_count
                added_bytes = sum(size for *_, size in rows)
                at_most = turn.recent_bytes + added_bytes if whole else None
                over_cap = turn.session.message_count + len(bodies) > self._policy.history_cap
                if over_cap:  # the trim scans the history: only when there is one to do
                    db.execute(
                        "DELETE FROM messages WHERE scope = ? AND name = ? AND id <= (SELECT id"
                        " FROM messages WHERE scope = ? AND name = ? ORDER BY id DESC"
                        " LIMIT 1 OFFSET ?)",
                        (scope, name, scope, name, self._policy.history_cap),
                    )
                self._trim_to_bytes(db, scope, name, at_most)
            db.execute(
                "UPDATE sessions SET updated = ?, lock_token = NULL, lock_expires = 0,"
                " last_turn = CASE WHEN ? THEN ? ELSE last_turn END"
                " WHERE scope = ? AND name = ?",
                (now, bool(bodies), turn.lock_token, scope, name),
            )
            return True

        outcome = await self._run(work)
        if isinstance(outcome, SessionCleared):
            raise outcome
        return outcome

    def _epoch_deleted(self, db: sqlite3.Connection, turn: Turn) -> bool:
        found = db.execute(
            "SELECT 1 FROM deleted_epochs WHERE scope = ? AND epoch = ?", (turn.scope, turn.epoch)
        )
        return bool(turn.epoch) and found.fetchone() is not None

    def _delete(self, db: sqlite3.Connection, scope: str, name: str) -> None:
        """Delete one session and its messages, remembering its epoch (see `delete_session`)."""
        db.execute(
            "INSERT OR REPLACE INTO deleted_epochs (scope, epoch, expires)"
            " SELECT scope, epoch, ? FROM sessions WHERE scope = ? AND name = ? AND epoch != ''",
            (time.time() + DELETED_TTL_SECONDS, scope, name),
        )
        db.execute("DELETE FROM messages WHERE scope = ? AND name = ?", (scope, name))
        db.execute("DELETE FROM sessions WHERE scope = ? AND name = ?", (scope, name))

    def _deleted(self, db: sqlite3.Connection, scope: str, ref: str, now: float) -> bool:
        """Whether the message `ref` was deleted before its turn saved it (and forget that)."""
        cursor = db.execute(
            "DELETE FROM forgotten WHERE scope = ? AND ref = ? AND expires >= ?", (scope, ref, now)
        )
        return cursor.rowcount > 0

    def _unlock(self, db: sqlite3.Connection, scope: str, name: str) -> None:
        db.execute(
            "UPDATE sessions SET lock_token = NULL, lock_expires = 0 WHERE scope = ? AND name = ?",
            (scope, name),
        )

    async def extend_lock(self, turn: Turn, lock_ms: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            now = time.time()
            expires = now + lock_ms / 1000
            cursor = db.execute(  # a lapsed lock stays lapsed, as a Redis key that expired
                "UPDATE sessions SET lock_expires = ?"
                " WHERE scope = ? AND name = ? AND lock_token = ? AND lock_expires > ?",
                (expires, turn.scope, stored_name(turn.session.name), turn.lock_token, now),
            )
            if cursor.rowcount != 1:
                return False
            if turn.claim is not None:
                db.execute(
                    "UPDATE claims SET expires = ? WHERE scope = ? AND claim = ? AND token = ?",
                    (expires, turn.scope, turn.claim, claim_lease(turn.lock_token)),
                )
            return True

        return await self._run(work, synced=False)

    async def current_session(self, scope: str) -> SessionInfo:
        def work(db: sqlite3.Connection) -> SessionInfo:
            name = self._current_name(db, scope) or DEFAULT_SESSION
            found = self._summary(db, scope, name)
            settings = SessionSettings(self._policy.default_model)
            return found or SessionInfo(shown_name(name), settings, 0, 0, 0)

        return await self._run(work)

    async def list_sessions(self, scope: str) -> list[SessionInfo]:
        def work(db: sqlite3.Connection) -> list[SessionInfo]:
            rows = db.execute(
                _SUMMARY + " ORDER BY s.updated DESC LIMIT ?",
                (scope, self._policy.sessions_per_place),
            ).fetchall()
            return listed_sessions(rows, self._policy.default_model)

        return await self._run(work)

    async def create_session(self, scope: str, name: str, settings: SessionSettings) -> SessionInfo:
        stored = stored_name(name)

        def work(db: sqlite3.Connection) -> SessionInfo:
            full = len(self._live_sessions(db, scope)) >= self._policy.sessions_per_place
            if full and not self._summary_row_exists(db, scope, stored):
                raise SessionLimit(self._policy.sessions_per_place)
            try:
                self._insert(db, scope, stored, settings)
            except sqlite3.IntegrityError:
                raise InvalidInput(
                    f"A session named {name!r} exists already; use /load {name}."
                ) from None
            self._set_current(db, scope, stored)
            created = self._summary(db, scope, stored)
            assert created is not None
            return created

        return await self._run(work)

    async def switch_session(self, scope: str, name: str) -> SessionInfo:
        stored = stored_name(name)

        def work(db: sqlite3.Connection) -> SessionInfo:
            found = self._summary(db, scope, stored)
            if found is None:
                raise UnknownSession(f"There is no session named {name!r}; /list shows them.")
            self._set_current(db, scope, stored)
            db.execute(
                "UPDATE sessions SET updated = ? WHERE scope = ? AND name = ?",
                (time.time(), scope, stored),
            )
            return found

        return await self._run(work)

    async def clear_session(self, scope: str) -> SessionInfo:
        def work(db: sqlite3.Connection) -> SessionInfo:
            try:
                name = self._current_or_create(db, scope)
            except DamagedState:  # an unreadable current name: start afresh, under a free name
                fresh, n = DEFAULT_SESSION, 0
                while self._summary_row_exists(db, scope, fresh):
                    n += 1
                    fresh = f"chat-{n}"
                self._set_current(db, scope, fresh)
                name = self._current_or_create(db, scope)
            db.execute("DELETE FROM messages WHERE scope = ? AND name = ?", (scope, name))
            now = time.time()
            db.execute(  # keeps what the reader accepts, replaces the rest
                f"UPDATE sessions SET updated = ?, format = ?, epoch = ?, {_NO_SUMMARY},"
                " lock_expires = CASE"
                " WHEN typeof(lock_expires) IN ('integer', 'real') THEN lock_expires ELSE 0 END,"
                " mcp = CASE WHEN json_valid(mcp) AND json_type(mcp) = 'array'"
                " AND NOT EXISTS (SELECT 1 FROM json_each(mcp) WHERE type != 'text')"
                " THEN mcp ELSE '[]' END,"
                " model = CASE WHEN typeof(model) = 'text' THEN model ELSE ? END,"
                " created = CASE WHEN typeof(created) IN ('integer', 'real') THEN created"
                " ELSE ? END"
                " WHERE scope = ? AND name = ?",
                (now, STORE_FORMAT, _epoch(), self._policy.default_model, now, scope, name),
            )
            cleared = self._summary(db, scope, name)
            assert cleared is not None
            return cleared

        return await self._run(work, synced=True)

    async def update_settings(self, scope: str, settings: SessionSettings) -> SessionInfo:
        def work(db: sqlite3.Connection) -> SessionInfo:
            name = self._current_or_create(db, scope)
            before = self._summary(db, scope, name)
            assert before is not None  # _session_info refused it if unreadable
            db.execute(
                "UPDATE sessions SET model = ?, mcp = ?, updated = ? WHERE scope = ? AND name = ?",
                (settings.model, mcp_json(settings), time.time(), scope, name),
            )
            after = self._summary(db, scope, name)
            assert after is not None
            return after

        return await self._run(work)

    async def forget_message(self, scope: str, user_ref: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM messages WHERE scope = ? AND ref = ?", (scope, user_ref)
            )
            if cursor.rowcount > 0:
                return True
            now = time.time()  # not stored (yet): a turn answering it must not store it
            db.execute("DELETE FROM forgotten WHERE expires < ?", (now,))
            db.execute(
                "INSERT OR REPLACE INTO forgotten (scope, ref, expires) VALUES (?, ?, ?)",
                (scope, user_ref, now + FORGOTTEN_TTL_SECONDS),
            )
            return False

        return await self._run(work, synced=True)

    async def delete_session(self, scope: str, name: str) -> str | None:
        shown, name = name, stored_name(name)

        def work(db: sqlite3.Connection) -> str | None:
            if not self._summary_row_exists(db, scope, name):
                raise UnknownSession(f"There is no session named {shown!r}; /list shows them.")
            self._delete(db, scope, name)
            try:
                current = self._current_name(db, scope)
            except DamagedState:  # an unreadable current name: replaced by the fresh one
                current = name
            if current != name and (current is not None or name != DEFAULT_SESSION):
                return None
            fresh, n = DEFAULT_SESSION, 0
            while self._summary_row_exists(db, scope, fresh):
                n += 1
                fresh = f"chat-{n}"
            self._insert(db, scope, fresh, SessionSettings(self._policy.default_model))
            self._set_current(db, scope, fresh)
            return fresh

        return await self._run(work, synced=True)

    async def forget_place(self, scope: str) -> int:
        def work(db: sqlite3.Connection) -> int:
            names = [
                str(row[0])
                for row in db.execute("SELECT name FROM sessions WHERE scope = ?", (scope,))
            ]
            for name in names:
                self._delete(db, scope, name)
            db.execute("DELETE FROM messages WHERE scope = ?", (scope,))  # none left unowned
            for table in ("scopes", "scope_options", "places"):
                db.execute(f"DELETE FROM {table} WHERE scope = ?", (scope,))
            return len(names)

        return await self._run(work, synced=True)

    @staticmethod
    def _option(db: sqlite3.Connection, scope: str, option: str) -> str | None:
        row = db.execute(
            "SELECT value FROM scope_options WHERE scope = ? AND option = ?", (scope, option)
        ).fetchone()
        return None if row is None else str(row[0])

    async def scope_option(self, scope: str, option: str) -> str | None:
        return await self._run(lambda db: self._option(db, scope, option))

    def _set_option(
        self, db: sqlite3.Connection, scope: str, option: str, value: str | None
    ) -> None:
        if value is None:
            db.execute("DELETE FROM scope_options WHERE scope = ? AND option = ?", (scope, option))
            return
        db.execute(
            "INSERT INTO scope_options (scope, option, value, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (scope, option)"
            " DO UPDATE SET value = excluded.value, updated = excluded.updated",
            (scope, option, value, time.time()),
        )

    async def set_scope_option(self, scope: str, option: str, value: str | None) -> None:
        await self._run(lambda db: self._set_option(db, scope, option, value))

    async def swap_scope_option(self, scope: str, option: str, expected: str, value: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            swapped = db.execute(
                "UPDATE scope_options SET value = ?, updated = ?"
                " WHERE scope = ? AND option = ? AND value = ?",
                (value, time.time(), scope, option, expected),
            )
            return swapped.rowcount == 1

        return await self._run(work)

    async def read_history(self, scope: str, name: str) -> list[Message]:
        def work(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT body FROM messages WHERE scope = ? AND name = ? ORDER BY id",
                (scope, stored_name(name)),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return decode_messages(name, await self._run(work))

    async def note_answer(self, scope: str, ref: str, replies: Sequence[str]) -> None:
        record = answer_record(replies)
        await self._run(
            lambda db: db.execute(
                "UPDATE messages SET answer_record = ? WHERE scope = ? AND ref = ?",
                (record, scope, ref),
            )
        )

    async def last_exchange(self, turn: Turn) -> Exchange | None:
        scope, name = turn.scope, stored_name(turn.session.name)

        def work(db: sqlite3.Connection) -> tuple[list[str], str | None, str | None] | None:
            bodies: list[str] = []
            for body, ref, record in db.execute(
                "SELECT body, ref, answer_record FROM messages WHERE scope = ? AND name = ?"
                " ORDER BY id DESC",
                (scope, name),
            ):
                bodies.append(str(body))
                try:
                    found = is_user_message(json.loads(body))
                except (ValueError, TypeError):
                    raise CorruptSession(turn.session.name) from None
                if found:
                    return bodies[::-1], ref, record
            return None

        found = await self._run(work)
        if found is None:
            return None
        bodies, ref, record = found
        return exchange_from(turn.session.name, bodies, ref, record)

    async def rewrite_last_exchange(
        self, turn: Turn, exchange: Exchange, answer: Sequence[Message] | None
    ) -> bool:
        scope, name = turn.scope, stored_name(turn.session.name)
        bodies = [] if answer is None else self._policy.check_sizes(answer)

        def work(db: sqlite3.Connection) -> bool | SessionCleared:
            row = _turn_row(db, scope, name)
            now = time.time()
            if row is not None and row[2] == turn.lock_token:
                return True  # done already: this call repeats one whose reply was lost
            if row is None or (row[0] != turn.lock_token and _number(row[1]) > now):
                return False
            held = row[0] == turn.lock_token and _number(row[1]) > now
            if row[3] != turn.epoch:  # cleared or replaced meanwhile
                if not held:
                    return False
                self._unlock(db, scope, name)
                return SessionCleared()
            if not held and (
                self._current_name(db, scope) != name or _position(db, scope, name) != turn.sequence
            ):
                return False  # the lock lapsed and the session moved on
            count = len(exchange.stored)
            tail = db.execute(
                "SELECT id, body FROM messages WHERE scope = ? AND name = ?"
                " ORDER BY id DESC LIMIT ?",
                (scope, name, count),
            ).fetchall()[::-1]
            if [body for _, body in tail] != list(exchange.stored):
                if held:
                    self._unlock(db, scope, name)
                return False
            dropped = tail if answer is None else tail[1:]
            db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i, _ in dropped])
            db.executemany(
                "INSERT INTO messages (scope, name, body, size) VALUES (?, ?, ?, ?)",
                [(scope, name, body, stored_bytes(body)) for body in bodies],
            )
            db.execute(
                "UPDATE sessions SET updated = ?, lock_token = NULL, lock_expires = 0,"
                " last_turn = ? WHERE scope = ? AND name = ?",
                (now, turn.lock_token, scope, name),
            )
            return True

        outcome = await self._run(work, synced=True if answer is None else None)  # /undo
        if isinstance(outcome, SessionCleared):
            raise outcome
        return outcome

    async def admit(self, admission: Admission) -> Refusal | None:
        return await self._run(lambda db: sqlite_usage.admit(db, admission), synced=False)

    async def record_usage(self, charge: Charge, *, session: bool = True) -> None:
        await self._run(lambda db: sqlite_usage.record(db, charge, session=session), synced=False)

    async def session_usage(self, scope: str, name: str, server: str, day: str) -> SessionUsage:
        return await self._run(lambda db: sqlite_usage.session_usage(db, scope, name, server, day))

    async def server_usage(self, server: str, days: list[str]) -> ServerUsage:
        return await self._run(lambda db: sqlite_usage.server_usage(db, server, days))

    async def import_sessions(
        self, scope: str, sessions: dict[str, list[Message]], settings: SessionSettings
    ) -> dict[str, int]:
        fitted = self._policy.stored_for_import(sessions)
        kept = {stored_name(name): stored for name, stored in fitted.items()}

        def work(db: sqlite3.Connection) -> None:
            if len(self._live_sessions(db, scope) | set(kept)) > self._policy.sessions_per_place:
                raise SessionLimit(self._policy.sessions_per_place)
            for name, stored in kept.items():
                db.execute("DELETE FROM messages WHERE scope = ? AND name = ?", (scope, name))
                db.execute("DELETE FROM sessions WHERE scope = ? AND name = ?", (scope, name))
                self._insert(db, scope, name, settings)
                db.executemany(
                    "INSERT INTO messages (scope, name, body, size) VALUES (?, ?, ?, ?)",
                    [(scope, name, body, stored_bytes(body)) for body in stored],
                )
            if kept and self._current_name(db, scope) is None:
                self._set_current(db, scope, next(iter(kept)))

        await self._run(work)
        return {name: len(stored) for name, stored in fitted.items()}

    async def read_summary(self, scope: str, name: str) -> Summary | None:
        stored = stored_name(name)

        def work(db: sqlite3.Connection) -> Summary | None:
            row = db.execute(
                "SELECT summary, summary_upto, summary_covered FROM sessions"
                " WHERE scope = ? AND name = ?",
                (scope, stored),
            ).fetchone()
            return None if row is None else _summary_of(*row)

        return await self._run(work)

    async def begin_summary(
        self, scope: str, name: str, token: str, lease_ms: int, keep: int, limit: int
    ) -> SummarySource | None:
        stored = stored_name(name)

        def work(
            db: sqlite3.Connection,
        ) -> tuple[str, Summary | None, list[tuple[int, str]], int] | SummaryInProgress | None:
            now = time.time()
            row = db.execute(
                "SELECT epoch, summary, summary_upto, summary_covered, summary_lease,"
                " summary_lease_expires FROM sessions WHERE scope = ? AND name = ?",
                (scope, stored),
            ).fetchone()
            if row is None:
                return None
            if row[4] not in (None, token) and _number(row[5]) > now:
                return SummaryInProgress()
            summary = _summary_of(*row[1:4])
            after = summary.upto if summary is not None else 0
            (uncovered,) = db.execute(
                "SELECT count(*) FROM messages WHERE scope = ? AND name = ? AND id > ?",
                (scope, stored, after),
            ).fetchone()
            wanted = min(uncovered - keep, limit)
            if wanted <= 0:
                return None
            rows = db.execute(
                "SELECT id, body FROM messages WHERE scope = ? AND name = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (scope, stored, after, wanted + 1),
            ).fetchall()
            db.execute(
                "UPDATE sessions SET summary_lease = ?, summary_lease_expires = ?"
                " WHERE scope = ? AND name = ?",
                (token, now + lease_ms / 1000, scope, stored),
            )
            return str(row[0]), summary, [(int(i), str(body)) for i, body in rows], wanted

        found = await self._run(work, synced=False)
        if found is None:
            return None
        if isinstance(found, SummaryInProgress):
            raise found
        epoch, summary, rows, wanted = found
        try:
            messages = decode_messages(name, [body for _, body in rows])
        except CorruptSession:
            await self.release_summary(scope, name, token)
            raise
        following = messages[wanted] if len(messages) > wanted else None
        return SummarySource(
            name,
            epoch,
            summary,
            messages[:wanted],
            [i for i, _ in rows[:wanted]],
            None if following is None else str(following.get("role")),
        )

    async def save_summary(
        self, scope: str, token: str, source: SummarySource, summary: Summary
    ) -> bool:
        stored = stored_name(source.name)

        def work(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT epoch, summary, summary_upto, summary_covered, summary_lease,"
                " summary_lease_expires FROM sessions WHERE scope = ? AND name = ?",
                (scope, stored),
            ).fetchone()
            if row is None:
                return False
            if row[4] not in (None, token) and _number(row[5]) > time.time():
                return False  # another process took the lease over: its summary counts
            self._release_summary(db, scope, stored, token)
            if row[0] != source.epoch or _summary_of(*row[1:4]) != source.summary:
                return False
            db.execute(
                "UPDATE sessions SET summary = ?, summary_upto = ?, summary_covered = ?"
                " WHERE scope = ? AND name = ?",
                (summary.text, summary.upto, summary.covered, scope, stored),
            )
            return True

        return await self._run(work)

    def _release_summary(self, db: sqlite3.Connection, scope: str, name: str, token: str) -> None:
        db.execute(
            "UPDATE sessions SET summary_lease = NULL, summary_lease_expires = 0"
            " WHERE scope = ? AND name = ? AND summary_lease = ?",
            (scope, name, token),
        )

    async def release_summary(self, scope: str, name: str, token: str) -> None:
        stored = stored_name(name)
        await self._run(lambda db: self._release_summary(db, scope, stored, token), synced=False)
