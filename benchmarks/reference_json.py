"""The reference pattern (shared/reference/session-management.md): every session in one JSON
file, read whole to load a session and read, modified and rewritten whole (indent=2) to save
one. Reimplemented faithfully; only the model is the instant one, as for the bot."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import MODEL, Conversation, InstantModel, Phases


class JsonFileSessions:
    """`load_sessions`, `save_sessions`, `get_session` and `save_session` of the reference."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load_sessions(self) -> dict[str, Any]:
        if self.path.exists():
            return json.loads(self.path.read_text())  # type: ignore[no-any-return]
        return {}

    def save_sessions(self, sessions: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(sessions, indent=2))

    def get_session(self, session_id: str) -> list[dict[str, Any]]:
        sessions = self.load_sessions()
        return sessions.get(session_id, [])  # type: ignore[no-any-return]

    def save_session(self, session_id: str, messages: list[dict[str, Any]]) -> None:
        sessions = self.load_sessions()
        sessions[session_id] = messages
        self.save_sessions(sessions)


async def chat(
    store: JsonFileSessions, model: InstantModel, session_id: str, user: dict[str, Any]
) -> str:
    """The reference's `chat()`: load, append, run with the whole history, save the whole
    conversation the run returns (`to_input_list()`)."""
    history = store.get_session(session_id)
    history.append(user)
    added = await model.complete(history, MODEL, [])
    store.save_session(session_id, history + added)
    return str(added[-1]["content"])


@dataclass(frozen=True)
class JsonResult:
    phases: Phases
    file_bytes: int


async def measure(
    path: Path,
    conversation: Conversation,
    sessions: Sequence[tuple[str, int]],
    measured: Sequence[str],
    turns: int,
    max_seconds: float,
) -> JsonResult:
    """Write the file holding `sessions` (scope, history length), then run turns round-robin
    over `measured` until `turns` are done or `max_seconds` have passed (at least one: at
    10,000 sessions one turn takes seconds, and a second one would not change the picture,
    only the length of the full run)."""
    store = JsonFileSessions(path)
    file_bytes = _write(store, {scope: conversation.history(length) for scope, length in sessions})
    model = InstantModel(conversation.answer)
    phases = Phases()
    started = time.monotonic()
    for turn in range(turns):
        if turn >= 1 and time.monotonic() - started > max_seconds:
            break
        model.model_ns = 0
        start = time.perf_counter_ns()
        await chat(store, model, measured[turn % len(measured)], conversation.user(turn))
        phases.total.append(time.perf_counter_ns() - start - model.model_ns)
        phases.sent_messages.append(model.sent_messages)
    store.path.unlink()
    return JsonResult(phases, file_bytes)


def _write(store: JsonFileSessions, sessions: dict[str, Any]) -> int:
    """The file as the reference leaves it; its size."""
    store.save_sessions(sessions)
    return store.path.stat().st_size
