"""A session as a file a person takes away: the reference's JSON (what `python -m bot import`
reads back, written by `bot.transfer`) or Markdown to read.

The Markdown keeps every message's text as it was, code blocks included; a block a message
leaves open is closed at its end, so the next speaker's heading is not swallowed by it. Tool
calls and their results are summarised in a line each. Messages carry no time of their own,
so the times shown are the session's (started, last used) and the export's.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bot.context import speaker_name
from bot.errors import InvalidInput
from bot.store.base import Message, SessionInfo, SessionStore
from bot.transfer import dump_sessions


class ExportFormat(StrEnum):
    JSON = "json"
    MARKDOWN = "markdown"


EXPORT_HELP = {
    ExportFormat.JSON: "what python -m bot import reads",
    ExportFormat.MARKDOWN: "to read",
}
PREVIEW_CHARS = 200
"""How much of a tool call's arguments the Markdown shows."""


@dataclass(frozen=True)
class Exported:
    filename: str
    data: bytes
    summary: str
    """One line to send with the file."""


class ExportTooLarge(InvalidInput):
    def __init__(self, size: int, limit: int, scope: str) -> None:
        super().__init__(
            f"This session's export is {_size(size, up=True)}, over the "
            f"{_size(limit, up=False)} a file may have here; nothing was sent. The bot's "
            f"admin can export it on its machine: python -m bot export FILE --scope {scope}"
        )


def _size(size: int, *, up: bool) -> str:
    """A size rounded up, a limit down: one over the limit never reads as equal to it."""
    if size < 1_048_576:
        return f"{-(-size // 1024) if up else size // 1024} KB"
    tenths = -(-size // 104_858) if up else size // 104_857
    return f"{tenths / 10:.1f} MB"


def checked_format(choice: str) -> ExportFormat:
    try:
        return ExportFormat(choice.strip().lower())
    except ValueError:
        raise InvalidInput(
            f"Unknown format {choice[:40]!r}. Choose one of: {', '.join(ExportFormat)}."
        ) from None


async def export_session(
    store: SessionStore, scope: str, choice: str, max_bytes: int | None = None
) -> Exported:
    """The scope's current session as a file in the chosen format; `InvalidInput` (nothing
    sent) for an unknown format, an empty session, or a file over `max_bytes`."""
    fmt = checked_format(choice)
    session = await store.current_session(scope)
    messages = await store.read_history(scope, session.name)
    if not messages:
        raise InvalidInput(f"Session {session.name} has no messages yet; nothing to export.")
    if fmt is ExportFormat.JSON:
        text = dump_sessions({session.name: messages})
        filename = f"{session.name}.json"
    else:
        text = session_markdown(session, messages)
        filename = f"{session.name}.md"
    data = text.encode()
    if max_bytes is not None and len(data) > max_bytes:
        raise ExportTooLarge(len(data), max_bytes, scope)
    count = f"{len(messages)} message{'s' if len(messages) != 1 else ''}"
    return Exported(
        filename, data, f"Session {session.name} ({count}) as {fmt.value}: {EXPORT_HELP[fmt]}."
    )


def session_markdown(session: SessionInfo, messages: list[Message]) -> str:
    def when(seconds: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))

    lines = [f"# Session {_escaped(session.name)}", "", f"- Messages: {len(messages)}"]
    lines.append(f"- Model: {session.settings.model}")
    if session.created_at:
        lines.append(f"- Started: {when(session.created_at)}")
    if session.updated_at:
        lines.append(f"- Last used: {when(session.updated_at)}")
    lines.append(f"- Exported: {when(time.time())}")
    out = "\n".join(lines) + "\n"
    names = _tool_names(messages)
    for message in messages:
        out += "\n" + _message_markdown(message, names) + "\n"
    return out


def _tool_names(messages: list[Message]) -> dict[str, str]:
    """Tool call id -> the tool's name, so a result can say what it answered."""
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict):
                names[str(call.get("id"))] = str((call.get("function") or {}).get("name", "?"))
    return names


def _message_markdown(message: Message, tool_names: dict[str, str]) -> str:
    role = message.get("role")
    text = _text_of(message.get("content"))
    if role == "tool":
        name = tool_names.get(str(message.get("tool_call_id")), "a tool")
        return f"> Tool {_code(name)} returned {len(text):,} characters."
    if role == "user":
        speaker, text = speaker_name(text)
        heading = speaker or "User"
    else:
        heading = "Assistant" if role == "assistant" else str(role).capitalize()
    parts = [f"### {_escaped(heading)}"]
    if text:
        parts.append(_closed_blocks(text))
    for call in message.get("tool_calls") or []:
        function = (call.get("function") or {}) if isinstance(call, dict) else {}
        arguments = " ".join(str(function.get("arguments", "")).split())
        if len(arguments) > PREVIEW_CHARS:
            arguments = arguments[:PREVIEW_CHARS] + "…"
        parts.append(
            f"> Called tool {_code(str(function.get('name', '?')))} with {_code(arguments)}"
        )
    return "\n\n".join(parts)


def _text_of(content: Any) -> str:
    """Text as stored; content parts (text and images) one after another."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    pieces = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            pieces.append(str(part.get("text", "")))
        elif part.get("type") == "image_url":
            pieces.append(f"[image: {(part.get('image_url') or {}).get('url', '')}]")
    return "\n".join(pieces)


_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")


def _closed_blocks(text: str) -> str:
    """`text` as it was, plus a closing fence when it ends inside a code block (Markdown's
    rule: a fence opens on a line of its own, with three or more backticks or tildes, and
    closes with a run of the same character at least as long and nothing after it)."""
    open_fence: str | None = None
    for line in text.split("\n"):
        fence = _FENCE.fullmatch(line)
        if fence is None:
            continue
        run, rest = fence[1], fence[2]
        if open_fence is None:
            if not (run[0] == "`" and "`" in rest):  # a backtick fence's info has none
                open_fence = run
        elif run[0] == open_fence[0] and len(run) >= len(open_fence) and not rest.strip():
            open_fence = None
    return text if open_fence is None else f"{text}\n{open_fence}"


def _code(text: str) -> str:
    """An inline code span that holds `text` whatever backticks it has."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _escaped(text: str) -> str:
    """A name shown as itself in a heading (names may hold Markdown's own characters)."""
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", text)
