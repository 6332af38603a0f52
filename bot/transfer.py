"""Import and export of the reference pattern's `sessions.json` (session id -> message list).

An import is checked whole before anything is stored and then written in one transaction, so
a bad file changes nothing and names the first problem's position.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bot.context import paired_tool_messages
from bot.errors import InvalidInput
from bot.store.base import Message, SessionSettings, SessionStore, checked_session_name

ROLES = {"system", "user", "assistant", "tool", "developer"}


class InvalidSessionFile(InvalidInput):
    pass


def parse_sessions_file(text: str) -> dict[str, list[Message]]:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidSessionFile(
            f"line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidSessionFile("$: expected an object mapping session names to message lists")
    sessions: dict[str, list[Message]] = {}
    for name, messages in data.items():
        where = f"$[{json.dumps(name)}]"
        try:
            checked_session_name(name)
        except InvalidInput as error:
            raise InvalidSessionFile(f"{where}: {error}") from None
        if not isinstance(messages, list):
            raise InvalidSessionFile(f"{where}: expected a list of messages")
        for i, message in enumerate(messages):
            _check_message(message, f"{where}[{i}]")
        sessions[name] = messages
    return sessions


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise InvalidSessionFile(f"{where}: expected a message object")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidSessionFile(f"{where}.role: expected one of {sorted(ROLES)}, got {role!r}")
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise InvalidSessionFile(f"{where}.content: expected a string, a list or null")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidSessionFile(f"{where}.tool_call_id: a tool message needs its call's id")
    calls = message.get("tool_calls")
    if calls is not None and not (
        isinstance(calls, list) and all(isinstance(c, dict) and "id" in c for c in calls)
    ):
        raise InvalidSessionFile(f"{where}.tool_calls: expected a list of calls with ids")


async def import_file(
    store: SessionStore, scope: str, path: Path, settings: SessionSettings
) -> dict[str, list[Message]]:
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidSessionFile(f"cannot read {path}: {error}") from None
    try:
        sessions = parse_sessions_file(text)
    except InvalidSessionFile as error:
        raise InvalidSessionFile(f"{path.name}: {error}") from None
    # Stored history keeps every tool call with its results (see bot/context.py).
    sessions = {name: paired_tool_messages(messages) for name, messages in sessions.items()}
    await store.import_sessions(scope, sessions, settings)
    return sessions


async def export_file(store: SessionStore, scope: str, path: Path) -> dict[str, list[Message]]:
    """Write the scope's sessions in the reference format; the file appears whole or not."""
    sessions = {
        info.name: await store.read_history(scope, info.name)
        for info in await store.list_sessions(scope)
    }
    await asyncio.to_thread(_write_whole, path, sessions)
    return sessions


def dump_sessions(sessions: dict[str, list[Message]]) -> str:
    """The reference format's text: what `parse_sessions_file` (and so an import) reads."""
    return json.dumps(sessions, indent=2, ensure_ascii=False)


def _write_whole(path: Path, sessions: dict[str, list[Message]]) -> None:
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.resolve().parent, delete=False, suffix=".tmp"
    ) as out:
        out.write(dump_sessions(sessions))
    os.replace(out.name, path)
