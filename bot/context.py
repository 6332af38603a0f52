"""What goes to the model: the system prompt plus the newest messages that fit the budget.

Providers reject a tool result without its call and an assistant `tool_calls` message without
all of its results, and some reject a conversation that does not start with a user message.
Stored history keeps every call with its results: the engine stores only what
`paired_tool_messages` kept of a run, and imports are repaired on the way in. What is left is
the cut: the window of newest messages may start mid-exchange, so it starts at its first user
message. That keeps the per-turn work independent of how many messages the window holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.store.base import Message, message_size, newest_fitting


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
    size = message_size(message)
    if size <= cap:
        return message
    note = cut_note(size, cap)
    content = message.get("content")
    if isinstance(content, str):
        text = content
        while text:
            candidate = {**message, "content": text + note}
            fitted = message_size(candidate)
            if fitted <= cap:
                return candidate
            text = text[: len(text) * cap // fitted - 1]
    kept: Message = {"role": message.get("role"), "content": note.strip()}
    if message.get("role") == "tool":
        kept["tool_call_id"] = message.get("tool_call_id")
    return kept


def _first_user(messages: Sequence[Message]) -> int:
    """Where the window may start: its first user message (its length when it has none)."""
    return next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages))


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


def history_room(system_prompt: str, user: Message, budget_bytes: int) -> int:
    """What the budget leaves for history beside the system prompt and the new message."""
    system: Message = {"role": "system", "content": system_prompt}
    return max(budget_bytes - message_size(system) - message_size(user), 0)


def build_context(
    system_prompt: str,
    recent: Sequence[Message],
    user: Message,
    room: int,
    recent_bytes: int | None = None,
    as_stored: bool = False,
) -> list[Message]:
    """System prompt, then as much recent history as fits in `room` (see `history_room`),
    then the new message. `recent_bytes`, when the store already measured `recent`, spares
    measuring it again whenever it fits whole (the common case); `as_stored`, when the
    store knows that no message of `recent` needs rewriting, spares looking at each."""
    fits = recent_bytes is not None and recent_bytes <= room
    window = recent if fits else newest_within(recent, room)
    system: Message = {"role": "system", "content": system_prompt}
    if as_stored:
        return [system, *window[_first_user(window) :], user]
    # One pass: stored system messages are dropped (ours is sent instead), and plain text
    # needs no rewriting, which is checked first to keep the pass cheap.
    return [
        system,
        *(
            m if type(m.get("content")) is str else with_images_as_notes(m)
            for m in window[_first_user(window) :]
            if m.get("role") != "system"
        ),
        user,
    ]
