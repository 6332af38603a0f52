"""Log lines for people (the default) or for machines (`LOG_FORMAT=json`: one JSON object per
line, for collectors such as Loki, CloudWatch or journald's JSON export).

A line written while a turn runs carries the turn's scope, session and Discord message id.
They come from a context variable set where the turn starts, so no call site passes them, and
asyncio copies it into the tasks a turn starts. Nothing here adds message content to a
line: a JSON line holds the same message text as the readable one, and an exception's
traceback without its message (an SDK error can quote a request), only its type and where
it was raised.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


_turn: ContextVar[tuple[str | None, str | None, str | None]] = ContextVar(
    "log_turn", default=(None, None, None)
)
"""The turn's scope, session and Discord message id: one variable, set once per turn."""


class about_turn:
    """Lines logged inside name this scope and, when given, this Discord message; the
    session, once `note_session` names it, until the block ends. A plain class: it wraps
    every turn, and is cheaper than a generator-based context manager."""

    __slots__ = ("_message_id", "_scope", "_token")

    def __init__(self, scope: str, message_id: str | None = None) -> None:
        self._scope, self._message_id = scope, message_id

    def __enter__(self) -> None:
        self._token = _turn.set((self._scope, None, self._message_id))

    def __exit__(self, *_: object) -> None:
        _turn.reset(self._token)


def note_session(name: str) -> None:
    """The session the current turn runs in, for its remaining lines (see `about_turn`)."""
    scope, _, message_id = _turn.get()
    _turn.set((scope, name, message_id))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in zip(("scope", "session", "message_id"), _turn.get(), strict=True):
            if value is not None:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            kind, _, trace = record.exc_info
            entry["error"] = kind.__name__
            entry["where"] = [
                f"{frame.filename}:{frame.lineno} in {frame.name}"
                for frame in traceback.extract_tb(trace)
            ]
        return json.dumps(entry, ensure_ascii=False)


PAYLOAD_LOGGERS = ("discord", "dedalus_labs", "httpx", "httpcore")
"""Libraries whose DEBUG lines dump whole payloads: gateway events, requests and answers,
with what people wrote in them. `LOG_LEVEL=DEBUG` is for the bot's own lines."""


def keep_payloads_out() -> None:
    """Hold the payload-dumping libraries at INFO, whatever the root level."""
    for name in PAYLOAD_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def use_json_lines(level: str) -> None:
    """Send every logger's lines (discord.py's included) to stderr as JSON objects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    keep_payloads_out()
