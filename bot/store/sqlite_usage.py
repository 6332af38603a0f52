"""Token usage and usage limits in SQLite (see `bot.usage`), used by `SqliteStore`: each
function runs inside the store's write transaction (`BEGIN IMMEDIATE`), which is what makes
a limit's check and its charge one atomic step across processes sharing the file."""

from __future__ import annotations

import sqlite3
from datetime import date, timedelta

from bot.usage import (
    NOTICE_SECONDS,
    RATE,
    RATE_WINDOW_SECONDS,
    SERVER_BUDGET,
    TOP_USERS_SHOWN,
    USAGE_DAYS_KEPT,
    USER_BUDGET,
    Admission,
    Charge,
    Refusal,
    ServerUsage,
    SessionUsage,
    Totals,
    next_day_at,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_days (
    server TEXT NOT NULL, day TEXT NOT NULL, user TEXT NOT NULL, scope TEXT NOT NULL,
    session TEXT NOT NULL, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL,
    estimated INTEGER NOT NULL, PRIMARY KEY (server, day, user, scope, session));
CREATE TABLE IF NOT EXISTS session_usage (
    scope TEXT NOT NULL, name TEXT NOT NULL, tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL, estimated INTEGER NOT NULL, PRIMARY KEY (scope, name));
CREATE TABLE IF NOT EXISTS rate_log (
    server TEXT NOT NULL, user TEXT NOT NULL, message TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (server, user, message));
CREATE TABLE IF NOT EXISTS limit_notices (
    server TEXT NOT NULL, user TEXT NOT NULL, until REAL NOT NULL, PRIMARY KEY (server, user));
"""


def _used(db: sqlite3.Connection, server: str, day: str, user: str | None = None) -> int:
    query = "SELECT coalesce(sum(tokens_in + tokens_out), 0) FROM usage_days"
    query += " WHERE server = ? AND day = ?"
    args: tuple[str, ...] = (server, day)
    if user is not None:
        query += " AND user = ?"
        args += (user,)
    return int(db.execute(query, args).fetchone()[0])


def admit(db: sqlite3.Connection, admission: Admission) -> Refusal | None:
    account, limits, now = admission.account, admission.limits, admission.now
    server, user = account.server, account.user
    refused: tuple[str, float] | None = None
    if limits.server_tokens_per_day and (
        _used(db, server, admission.day) >= limits.server_tokens_per_day
    ):
        refused = (SERVER_BUDGET, next_day_at(now))
    elif limits.user_tokens_per_day and (
        _used(db, server, admission.day, user) >= limits.user_tokens_per_day
    ):
        refused = (USER_BUDGET, next_day_at(now))
    elif limits.messages_per_minute:
        db.execute(
            "DELETE FROM rate_log WHERE server = ? AND user = ? AND at <= ?",
            (server, user, now - RATE_WINDOW_SECONDS),
        )
        seen = db.execute(
            "SELECT 1 FROM rate_log WHERE server = ? AND user = ? AND message = ?",
            (server, user, admission.message),
        ).fetchone()
        if seen is None:
            count, oldest = db.execute(
                "SELECT count(*), min(at) FROM rate_log WHERE server = ? AND user = ?",
                (server, user),
            ).fetchone()
            if count >= limits.messages_per_minute:
                refused = (RATE, float(oldest) + RATE_WINDOW_SECONDS)
            else:
                db.execute(
                    "INSERT INTO rate_log (server, user, message, at) VALUES (?, ?, ?, ?)",
                    (server, user, admission.message, now),
                )
    if refused is None:
        return None
    told = db.execute(
        "SELECT until FROM limit_notices WHERE server = ? AND user = ?", (server, user)
    ).fetchone()
    notify = told is None or not isinstance(told[0], int | float) or told[0] <= now
    if notify:
        db.execute(
            "INSERT INTO limit_notices (server, user, until) VALUES (?, ?, ?)"
            " ON CONFLICT (server, user) DO UPDATE SET until = excluded.until",
            (server, user, now + NOTICE_SECONDS),
        )
    return Refusal(refused[0], refused[1], notify)


def record(db: sqlite3.Connection, charge: Charge, *, session: bool = True) -> None:
    usage, account = charge.usage, charge.account
    estimated = usage.estimated_tokens
    db.execute(
        "INSERT INTO usage_days (server, day, user, scope, session, tokens_in, tokens_out,"
        " estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
        " tokens_in = tokens_in + excluded.tokens_in,"
        " tokens_out = tokens_out + excluded.tokens_out,"
        " estimated = estimated + excluded.estimated",
        (
            account.server,
            charge.day,
            account.user,
            charge.scope,
            charge.session,
            usage.input_tokens,
            usage.output_tokens,
            estimated,
        ),
    )
    if session:
        record_session(db, charge)
    oldest = (date.fromisoformat(charge.day) - timedelta(days=USAGE_DAYS_KEPT)).isoformat()
    db.execute("DELETE FROM usage_days WHERE server = ? AND day < ?", (account.server, oldest))


def record_session(db: sqlite3.Connection, charge: Charge) -> None:
    """The session's share of `record` (a turn's save adds it in its own transaction)."""
    usage = charge.usage
    estimated = usage.estimated_tokens
    db.execute(
        "INSERT INTO session_usage (scope, name, tokens_in, tokens_out, estimated)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
        " tokens_in = tokens_in + excluded.tokens_in,"
        " tokens_out = tokens_out + excluded.tokens_out,"
        " estimated = estimated + excluded.estimated",
        (charge.scope, charge.session, usage.input_tokens, usage.output_tokens, estimated),
    )


def session_usage(
    db: sqlite3.Connection, scope: str, name: str, server: str, day: str
) -> SessionUsage:
    row = db.execute(
        "SELECT tokens_in, tokens_out, estimated FROM session_usage WHERE scope = ? AND name = ?",
        (scope, name),
    ).fetchone()
    (today,) = db.execute(
        "SELECT coalesce(sum(tokens_in + tokens_out), 0) FROM usage_days"
        " WHERE server = ? AND day = ? AND scope = ? AND session = ?",
        (server, day, scope, name),
    ).fetchone()
    totals = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
    return SessionUsage(*totals, today=int(today), server_today=_used(db, server, day))


def server_usage(db: sqlite3.Connection, server: str, days: list[str]) -> ServerUsage:
    marks = ",".join("?" * len(days))
    sums = (
        "SELECT coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0),"
        " coalesce(sum(estimated), 0) FROM usage_days WHERE server = ? AND day IN "
    )
    today = db.execute(sums + "(?)", (server, days[0])).fetchone()
    period = db.execute(sums + f"({marks})", (server, *days)).fetchone()
    top = db.execute(
        "SELECT user, sum(tokens_in + tokens_out) AS used FROM usage_days"
        f" WHERE server = ? AND day IN ({marks}) GROUP BY user ORDER BY used DESC, user LIMIT ?",
        (server, *days, TOP_USERS_SHOWN),
    ).fetchall()
    return ServerUsage(
        Totals(*map(int, today)),
        Totals(*map(int, period)),
        [(str(user), int(used)) for user, used in top],
    )


def purge(db: sqlite3.Connection, now: float, sessions_expire: bool) -> None:
    """Lapsed rate entries and notices; with a TTL, the totals of sessions that are gone."""
    db.execute("DELETE FROM rate_log WHERE at <= ?", (now - RATE_WINDOW_SECONDS,))
    db.execute("DELETE FROM limit_notices WHERE until <= ?", (now,))
    if sessions_expire:
        db.execute(
            "DELETE FROM session_usage WHERE NOT EXISTS (SELECT 1 FROM sessions s"
            " WHERE s.scope = session_usage.scope AND s.name = session_usage.name)"
        )
