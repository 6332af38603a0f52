"""What goes to the model: the system prompt plus the newest messages that fit the budget.

Providers reject a tool result without its call and an assistant `tool_calls` message without
all of its results, and some reject a conversation that does not start with a user message.
Stored history keeps every call with its results: the engine stores only what
`paired_tool_messages` kept of a run, and imports are repaired on the way in. What is left is
the cut: the window of newest messages may start mid-exchange, so it starts at its first user
message. That keeps the per-turn work independent of how many messages the window holds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bot.store.base import Message, encode_message, message_size, newest_fitting, stored_bytes

CHANNEL_CONTEXT_MESSAGES = 50
"""A mention brings along at most this many of the place's earlier messages (Discord serves
up to 100 in the one request this takes)..."""
CHANNEL_CONTEXT_SHARE = 0.25
"""...and at most this share of the context budget (the newest that fit)."""
CHANNEL_CONTEXT_HEADER = (
    "Messages in the channel since your last answer (for context; not addressed to you):"
)


def newest_within(messages: Sequence[Message], budget_bytes: int) -> list[Message]:
    """The longest tail of `messages` whose stored size fits the budget."""
    count, _ = newest_fitting(map(message_size, reversed(messages)), budget_bytes)
    return list(messages[len(messages) - count :])


def paired_tool_messages(messages: Sequence[Message]) -> list[Message]:
    """Drop tool results without their call, and calls without all their results (keeping
    any text such a call message carried)."""
    answered = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
    result: list[Message] = []
    open_calls: set[str] = set()
    for message in messages:
        calls = message.get("tool_calls") or []
        if message.get("role") == "assistant" and calls:
            ids = {str(call.get("id")) for call in calls}
            if not ids <= answered:
                if message.get("content"):
                    result.append({"role": "assistant", "content": message["content"]})
                continue
            open_calls |= ids
        elif message.get("role") == "tool" and message.get("tool_call_id") not in open_calls:
            continue
        result.append(message)
    return result


def cut_note(size: int, cap: int) -> str:
    kb = -(-size // 1024)
    return f"\n\n[cut here when stored: the whole message was {kb} KB, over {cap // 1024} KB]"


def within_size(message: Message, cap: int) -> Message:
    """`message`, or a copy that fits `cap` stored bytes: its text cut with a note saying so,
    or, when even that cannot fit (huge tool-call arguments), the note alone. A call message
    that loses its calls leaves its results orphaned, and `paired_tool_messages` drops them."""
    return fitted_and_stored(message, cap)[0]


def fitted_and_stored(message: Message, cap: int) -> tuple[Message, str]:
    """`within_size`, and what it returns as stored (`encode_message`, done on the way to
    measure it, so a caller that saves it does not encode the message again)."""
    stored = encode_message(message)
    size = stored_bytes(stored)
    if size <= cap:
        return message, stored
    note = cut_note(size, cap)
    content = message.get("content")
    if isinstance(content, str):
        text = content
        while text:
            candidate = {**message, "content": text + note}
            stored = encode_message(candidate)
            fitted = stored_bytes(stored)
            if fitted <= cap:
                return candidate, stored
            text = text[: len(text) * cap // fitted - 1]
    kept: Message = {"role": message.get("role"), "content": note.strip()}
    if message.get("role") == "tool":
        kept["tool_call_id"] = message.get("tool_call_id")
    return kept, encode_message(kept)


def _first_user(messages: Sequence[Message], start: int = 0) -> int:
    """Where a window from `start` may start: its first user message from there (the length
    of `messages` when none is), found without copying the window out."""
    for i in range(start, len(messages)):
        if messages[i].get("role") == "user":
            return i
    return len(messages)


IMAGE_NOTE = "[an image was shared here; it was shown to you when it was sent]"


def with_images_as_notes(message: Message) -> Message:
    """A stored message with its image parts replaced by a note. Attachment URLs (Discord's
    CDN among them) expire, and a provider that cannot fetch one refuses the whole request,
    so only the new message carries its images; the answers already describe older ones."""
    content = message.get("content")
    if not isinstance(content, list) or not any(
        isinstance(part, dict) and part.get("type") == "image_url" for part in content
    ):
        return message
    texts = [
        str(part.get("text", ""))
        for part in content
        if isinstance(part, dict) and part.get("type") == "text"
    ]
    return {**message, "content": "\n".join([*texts, IMAGE_NOTE])}


def system_prompt(default: str, persona: str | None, persona_note: str = "") -> str:
    """What the model is told first: a place's persona, which replaces the default prompt,
    followed by the note on how the chat reaches the model (speakers, markdown), or the
    default prompt when the place has no persona."""
    if persona is None:
        return default
    return f"{persona}\n\n{persona_note}" if persona_note else persona


@dataclass(frozen=True)
class ChannelContext:
    """What was said around a message addressed to the bot that its session does not hold.
    It goes with that one turn and is never stored: the channel itself is the record, and
    a second copy of it would grow without bound. Each item is a user message as the
    message being answered would be (speaker first, files inlined, images as parts)."""

    recent: Sequence[Message] = ()
    """The place's messages since the bot's last answer there, oldest first."""
    earlier: Sequence[Message] = ()
    """Older messages that matter anyway (a thread's first message, the message replied
    to), each already labelled; kept before any of `recent` when room is short."""


def channel_context_message(context: ChannelContext | None, cap_bytes: int) -> Message | None:
    """One user message, marked as context, to go just before the new message: `earlier`,
    then the newest of `recent` that fit, all within `cap_bytes` of stored size. None when
    there is nothing (or nothing fits)."""
    if context is None:
        return None
    header: Message = {"role": "user", "content": CHANNEL_CONTEXT_HEADER}
    room = cap_bytes - message_size(header)
    earlier: list[Message] = []
    for item in context.earlier:
        size = message_size(item)
        if size <= room:
            earlier.append(item)
            room -= size
    count, _ = newest_fitting(map(message_size, reversed(context.recent)), room)
    items = [*earlier, *context.recent[len(context.recent) - count :]]
    if not items:
        return None
    parts: list[dict[str, Any]] = []
    texts = [CHANNEL_CONTEXT_HEADER]

    def flush() -> None:
        if texts:
            parts.append({"type": "text", "text": "\n".join(texts)})
            texts.clear()

    for item in items:
        content = item.get("content")
        for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:  # an image, kept where it was shared
                flush()
                parts.append(part)
    if not parts:
        return {"role": "user", "content": "\n".join(texts)}
    flush()
    return {"role": "user", "content": parts}


@functools.lru_cache(maxsize=256)
def _system_size(system_prompt: str) -> int:
    """The stored size of the system prompt sent first. Every turn sends one of a few
    prompts (the default, or a place's persona), so each is measured once, not per turn."""
    return message_size({"role": "system", "content": system_prompt})


def history_room(
    system_prompt: str, user: Message, budget_bytes: int, *, user_bytes: int | None = None
) -> int:
    """What the budget leaves for history beside the system prompt and the new message: the
    most a turn loads from the store (`build_context` then fits the other parts in).
    `user_bytes`: the new message's stored size, when the caller measured it already."""
    if user_bytes is None:
        user_bytes = message_size(user)
    return max(budget_bytes - _system_size(system_prompt) - user_bytes, 0)


SUMMARY_HEADING = (
    "Summary of the earlier part of this conversation (those messages are not shown):\n"
)


def summary_message(text: str) -> Message:
    """The one message that stands for the summarized history, ahead of the rest."""
    return {"role": "system", "content": SUMMARY_HEADING + text}


@dataclass(frozen=True)
class Context:
    """What is sent, and how the budget was spent on it."""

    messages: list[Message]
    history_room: int
    """What the budget left for history once the other parts were in."""
    history_bytes: int
    history_from: int
    """Index in `recent` of the oldest message sent (`len(recent)` when none was): the ones
    before it fell out (or were skipped so the history starts at a user message)."""
    total_bytes: int
    """The stored size of every message sent: never over the budget, unless the system
    prompt and the new message alone are (they are always sent)."""


def build_context(
    system_prompt: str,
    summary: str | None,
    channel_context: Sequence[Message],
    recent: Sequence[Message],
    user: Message,
    budget: int,
    *,
    recent_bytes: int | None = None,
    as_stored: bool = False,
    user_bytes: int | None = None,
) -> Context:
    """The one place that decides what is sent, counting each part's stored size against
    `budget`, in this order of precedence: the system prompt (the channel's persona, when it
    has one) and the new message, always; then the summary of the older history; then the
    channel's messages around a mention (the newest that fit); then the newest history that
    fits, starting at a user message so no tool result comes without its call. They are sent
    as system prompt, summary, history, channel context, new message.

    `recent_bytes`, when the store already measured `recent`, spares measuring it again
    whenever it fits whole (the common case); `as_stored`, when the store knows that no
    message of `recent` needs rewriting, spares looking at each; `user_bytes`, the new
    message's stored size when the caller measured it, spares measuring it again."""
    system: Message = {"role": "system", "content": system_prompt}
    if user_bytes is None:
        user_bytes = message_size(user)
    used = _system_size(system_prompt) + user_bytes
    head = [system]
    if summary:
        note = summary_message(summary)
        size = message_size(note)
        if used + size <= budget:
            head.append(note)
            used += size
    channel: Sequence[Message] = ()
    if channel_context:
        channel = newest_within(channel_context, max(budget - used, 0))
        used += sum(map(message_size, channel))
    room = max(budget - used, 0)
    if recent_bytes is not None and recent_bytes <= room:
        start, window_bytes = 0, recent_bytes
    else:
        count, window_bytes = newest_fitting(map(message_size, reversed(recent)), room)
        start = len(recent) - count
    skipped = _first_user(recent, start) - start
    if skipped:
        window_bytes -= sum(map(message_size, recent[start : start + skipped]))
        start += skipped
    if as_stored:  # the window is sent as it is: copied once, into the messages sent
        messages = head
        messages += recent[start:] if start else recent
    else:
        history, window_bytes, dropped = _sendable(recent[start:], window_bytes, room)
        start = start + dropped if history else len(recent)
        messages = head + history
    messages += channel
    messages.append(user)
    return Context(
        messages=messages,
        history_room=room,
        history_bytes=window_bytes,
        history_from=start,
        total_bytes=used + window_bytes,
    )


def _sendable(window: Sequence[Message], size: int, room: int) -> tuple[list[Message], int, int]:
    """`window` as it may be sent, its size, and how many of its oldest messages had to go:
    stored system messages are dropped (ours is sent instead), images become notes. Plain
    text needs no rewriting, which is checked first to keep the pass cheap; only what changes
    is measured again. A note may be longer than the image part it replaces, so the oldest
    messages go again while the window does not fit."""
    kept: list[tuple[int, Message]] = []
    for i, message in enumerate(window):
        if message.get("role") == "system":
            size -= message_size(message)
            continue
        if type(message.get("content")) is str:
            kept.append((i, message))
            continue
        sent = with_images_as_notes(message)
        if sent is not message:
            size += message_size(sent) - message_size(message)
        kept.append((i, sent))
    first = 0
    while first < len(kept) and (size > room or kept[first][1].get("role") != "user"):
        size -= message_size(kept[first][1])
        first += 1
    dropped = kept[first][0] if first < len(kept) else len(window)
    return [m for _, m in kept[first:]], size, dropped


_SPEAKER = re.compile(r"\[[^\]]*\(user id (\d+)\)\]: ?")
"""A speaker's label at the start of a stored user message. A name holds no ']', so the
label ends at the first one and the id before it is the real one, whatever the name says."""


def speaker_label(name: str, user_id: int | str) -> str:
    """How a user message starts (stored and sent), so the model can tell speakers apart and
    /retry and /undo can tell who asked."""
    shown = name.replace("[", "(").replace("]", ")")
    return f"[{shown} (user id {user_id})]"


def speaker_of(message: Message) -> tuple[str | None, str]:
    """Who said a user message (their id, None when it has no label) and its text without
    the label (text parts joined)."""
    content = message.get("content")
    if isinstance(content, list):
        parts = [part.get("text") for part in content if isinstance(part, dict)]
        content = "\n".join(part for part in parts if isinstance(part, str))
    text = str(content or "")
    label = _SPEAKER.match(text)
    return (label[1], text[label.end() :]) if label else (None, text)


def speaker_name(text: str) -> tuple[str | None, str]:
    """The name a stored user message's label shows (None without a label), and the text
    after the label: who spoke, for people reading an export."""
    label = _SPEAKER.match(text)
    if label is None:
        return None, text
    return text[1 : label.start(1) - len("(user id ")].rstrip(), text[label.end() :]
