"""Import and export of the reference pattern's `sessions.json` (session name -> message list).

An import is checked whole before anything is stored and then written in one transaction, so
a bad file changes nothing and names the first problem's position. It never changes data
silently: a name already taken is refused, imported beside it or replaced only as asked
(`OnConflict`), and what was replaced, renamed, dropped or cut is reported, one line each.

An export appears whole or not at all: it is written to a temporary file beside the target
and renamed over it, and the temporary file is removed on every failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from bot.context import paired_tool_messages
from bot.errors import InvalidInput
from bot.store.base import (
    SESSION_NAME_MAX,
    Message,
    SessionSettings,
    SessionStore,
    encode_message,
    session_name_problem,
)

ROLES = {"system", "user", "assistant", "tool", "developer"}


class InvalidSessionFile(InvalidInput):
    pass


class ExportFailed(InvalidInput):
    pass


class EmptyScope(ExportFailed):
    """A scope with no sessions: a mistyped scope looks the same, so `hint` may say how
    scopes are named."""

    def __init__(self, scope: str, hint: str = "") -> None:
        said = f"Scope {scope!r} has no sessions; nothing was written."
        super().__init__(f"{said} {hint}".strip())


class OnConflict(StrEnum):
    """What an import does with a session whose name the scope already has."""

    REFUSE = "refuse"
    """Import nothing and name the sessions in the way (the default: nothing is lost)."""
    KEEP_BOTH = "keep-both"
    """Import it under a free name, `name (2)`, leaving the stored one as it was."""
    REPLACE = "replace"
    """Replace the stored session with the file's."""


@dataclass(frozen=True)
class ImportReport:
    """What an import did, for the person who ran it."""

    scope: str
    stored: dict[str, int]
    """Name stored under -> messages stored, in the file's order."""
    renamed: dict[str, str] = field(default_factory=dict)
    """Name in the file -> the free name it was stored under (`OnConflict.KEEP_BOTH`)."""
    replaced: dict[str, int] = field(default_factory=dict)
    """Name -> how many messages the replaced session held (`OnConflict.REPLACE`)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Name stored under -> tool messages dropped for lacking their call or their results."""
    cut: dict[str, int] = field(default_factory=dict)
    """Name stored under -> oldest messages left out to stay within the history caps."""

    def lines(self) -> list[str]:
        names = ", ".join(repr(name) for name in self.stored)
        done = f"Imported {len(self.stored)} session(s) into scope {self.scope!r}"
        lines = [f"{done}: {names}." if names else f"{done}; the file holds none."]
        lines += [
            f"Kept both: the file's {name!r} was imported as {new!r}; the stored one is unchanged."
            for name, new in self.renamed.items()
        ]
        lines += [
            f"Replaced the stored {name!r} ({count} message(s) before)."
            for name, count in self.replaced.items()
        ]
        lines += [
            f"Dropped the unpaired tool calls or results of {count} message(s) of {name!r} "
            "(the model refuses them); any text they carried was kept."
            for name, count in self.dropped.items()
        ]
        lines += [
            f"Left out the oldest {count} message(s) of {name!r}, over HISTORY_CAP_MESSAGES "
            "or HISTORY_CAP_MB."
            for name, count in self.cut.items()
        ]
        return lines


def parse_sessions_file(text: str) -> dict[str, list[Message]]:
    try:
        data: Any = json.loads(text, object_pairs_hook=_refuse_repeated_names)
    except _RepeatedName as repeated:
        raise InvalidSessionFile(
            f"$[{json.dumps(repeated.name, ensure_ascii=False)}]: this session appears twice "
            "in the file"
        ) from None
    except json.JSONDecodeError as error:
        raise InvalidSessionFile(
            f"line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidSessionFile("$: expected an object mapping session names to message lists")
    sessions: dict[str, list[Message]] = {}
    for name, messages in data.items():
        where = f"$[{json.dumps(name, ensure_ascii=False)}]"
        problem = session_name_problem(name)
        if problem is not None:
            raise InvalidSessionFile(f"{where}: {problem}")
        if not isinstance(messages, list):
            raise InvalidSessionFile(f"{where}: expected a list of messages")
        for i, message in enumerate(messages):
            _check_message(message, f"{where}[{i}]")
        sessions[name] = messages
    return sessions


class _RepeatedName(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _refuse_repeated_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON keeps the last of two same-named entries; a file holding two sessions of one
    name is refused instead, so neither is lost unseen."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _RepeatedName(key)
        found[key] = value
    return found


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
    try:
        encode_message(message).encode()
    except UnicodeEncodeError:
        raise InvalidSessionFile(
            f"{where}: holds a lone surrogate escape (such as \\ud800), which is not text"
        ) from None


def free_name(name: str, taken: Iterable[str]) -> str:
    """`name (2)`, `name (3)`, ... the first not taken, shortened to fit the name limit."""
    used = set(taken)
    n = 2
    while True:
        suffix = f" ({n})"
        candidate = name[: SESSION_NAME_MAX - len(suffix)].rstrip() + suffix
        if candidate not in used:
            return candidate
        n += 1


async def import_file(
    store: SessionStore,
    scope: str,
    path: Path,
    settings: SessionSettings,
    on_conflict: OnConflict = OnConflict.REFUSE,
) -> ImportReport:
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidSessionFile(f"cannot read {path}: it is not UTF-8 text") from None
    except OSError as error:
        raise InvalidSessionFile(f"cannot read {path}: {error.strerror}") from None
    try:
        sessions = parse_sessions_file(text)
    except InvalidSessionFile as error:
        raise InvalidSessionFile(f"{path.name}: {error}") from None
    return await import_sessions(store, scope, sessions, settings, on_conflict)


async def import_sessions(
    store: SessionStore,
    scope: str,
    sessions: dict[str, list[Message]],
    settings: SessionSettings,
    on_conflict: OnConflict = OnConflict.REFUSE,
) -> ImportReport:
    """Store parsed sessions as `on_conflict` says, reporting every change made to them."""
    existing = {info.name: info.message_count for info in await store.list_sessions(scope)}
    clashing = [name for name in sessions if name in existing]
    if clashing and on_conflict is OnConflict.REFUSE:
        names = ", ".join(repr(name) for name in clashing)
        raise InvalidInput(
            f"Scope {scope!r} already has session(s) {names}; nothing was imported. "
            "Choose --on-conflict keep-both (import beside them) or replace (overwrite them)."
        )
    renamed: dict[str, str] = {}
    if on_conflict is OnConflict.KEEP_BOTH:
        taken = set(existing) | set(sessions)
        for name in clashing:
            renamed[name] = free_name(name, taken)
            taken.add(renamed[name])
    # Stored history keeps every tool call with its results (see bot/context.py).
    paired: dict[str, list[Message]] = {}
    dropped: dict[str, int] = {}
    for name, messages in sessions.items():
        kept = paired_tool_messages(messages)
        unchanged = {id(message) for message in kept}
        changed = sum(1 for message in messages if id(message) not in unchanged)
        if changed:
            dropped[renamed.get(name, name)] = changed
        paired[renamed.get(name, name)] = kept
    stored = await store.import_sessions(scope, paired, settings)
    return ImportReport(
        scope=scope,
        stored=stored,
        renamed=renamed,
        replaced={name: existing[name] for name in clashing if name not in renamed},
        dropped=dropped,
        cut={
            name: len(paired[name]) - count
            for name, count in stored.items()
            if count < len(paired[name])
        },
    )


async def read_sessions(store: SessionStore, scope: str) -> dict[str, list[Message]]:
    """Every session of the scope with its whole history, most recently used first."""
    return {
        info.name: await store.read_history(scope, info.name)
        for info in await store.list_sessions(scope)
    }


async def export_file(store: SessionStore, scope: str, path: Path) -> dict[str, list[Message]]:
    """Write the scope's sessions in the reference format; the file appears whole or not.
    A scope with no sessions (a mistyped one among them) is refused, writing nothing."""
    _check_target(path)
    sessions = await read_sessions(store, scope)
    if not sessions:
        raise EmptyScope(scope)
    await asyncio.to_thread(write_whole, path, dump_sessions(sessions))
    return sessions


def dump_sessions(sessions: dict[str, list[Message]]) -> str:
    """The reference format's text: what `parse_sessions_file` (and so an import) reads."""
    return json.dumps(sessions, indent=2, ensure_ascii=False)


def _check_target(path: Path) -> None:
    """The target's problems a person can fix, found before the store is read."""
    folder = path.absolute().parent
    try:
        if path.is_dir():
            suggestion = path / "sessions.json"
            raise ExportFailed(f"{path} is a folder; give a file name, such as {suggestion}.")
        if not folder.is_dir():
            raise ExportFailed(f"The folder {folder} does not exist; nothing was written.")
    except OSError as error:  # a name too long, a folder not searchable
        raise ExportFailed(f"Cannot write {path}: {error.strerror}; nothing was written.") from None


def write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it (same folder, so the rename
    is atomic and nothing is left in the system's temporary folder), removed on failure."""
    folder = path.absolute().parent
    try:
        handle, temporary = tempfile.mkstemp(
            dir=folder, prefix=f".{path.name[:40]}.", suffix=".tmp"
        )
    except OSError as error:
        raise ExportFailed(
            f"Cannot write in {folder}: {error.strerror}; nothing was written."
        ) from None
    try:
        with open(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            problem = f"Cannot write {path}: {error.strerror}; nothing was written."
            raise ExportFailed(problem) from None
        raise
