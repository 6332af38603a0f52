"""Summaries of long conversations: the older history, folded into one message the model wrote.

When a session's history no longer fits the context budget, the engine asks for its oldest
messages not yet covered to be folded into the summary (new summary = model(old summary +
the messages that fell out since)); `bot.context` then sends the summary ahead of the newest
messages. Stored messages are never removed by this: the summary is kept beside them, with
the position of the newest message it covers, so each stretch of history is folded once.

The store's summarizing lease keeps two processes from summarizing one session at once, and
a summary is saved only onto the summary it was written from, in a session not cleared
meanwhile. A fold cuts only before a user message, so no exchange (an assistant `tool_calls`
message and its results) is split between the summary and the history sent verbatim.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Sequence

from bot.errors import InvalidInput, ModelError, StoreUnavailable, SummaryFailed
from bot.model import ModelChoice, ModelClient
from bot.store.base import Message, SessionStore, Summary, SummarySource, message_size
from bot.usage import Account, UsageLedger

SUMMARY_REQUEST_MARK = "You keep the memory of a long Discord conversation."
"""How a summary request starts (its system message): the fake model recognises it by this."""
SUMMARY_ROUND_MESSAGES = 400
"""At most this many messages are read for one fold (fewer when they do not fit the budget)."""
COMPACT_ROUNDS = 20
"""`/compact` folds at most this many times in a row (a long imported history needs several)."""
LINE_MAX_CHARS = 4_000
"""A message is shown to the summarizer cut to this many characters (or less, see below)."""


def transcript_line(message: Message, max_chars: int) -> str:
    """One message as the summarizer reads it: its role and text, tool calls by name."""
    role = str(message.get("role"))
    content = message.get("content")
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        text = " ".join(str(p.get("text", "")) for p in parts if p.get("type") == "text")
        if any(p.get("type") == "image_url" for p in parts):
            text += " [an image]"
    else:
        text = "" if content is None else str(content)
    calls = message.get("tool_calls") or []
    if calls:
        named = [
            f"{call.get('function', {}).get('name')}({call.get('function', {}).get('arguments')})"
            for call in calls
            if isinstance(call, dict)
        ]
        text += f" [called {', '.join(named)}]"
    if role == "tool":
        role = "tool result"
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return f"{role}: {text.strip()}"


def _json_size(text: str) -> int:
    """Bytes `text` adds to a message's stored (JSON) form."""
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


class Summarizer:
    """Folds a session's uncovered older messages into its summary, one stretch at a time."""

    def __init__(
        self,
        store: SessionStore,
        model: ModelClient,
        budget_bytes: int,
        lease_ms: int,
        ledger: UsageLedger | None = None,
    ) -> None:
        """`ledger` charges each summary call to the session and the account given (by
        default, to the store without another clock)."""
        self._store = store
        self._model = model
        self._ledger = ledger or UsageLedger(store)
        self._budget = budget_bytes
        self._lease_ms = lease_ms

    @property
    def max_bytes(self) -> int:
        """A summary is kept to an eighth of the context budget, so the history keeps most."""
        return max(self._budget // 8, 200)

    def _instructions(self) -> Message:
        words = self.max_bytes // 8
        return {
            "role": "system",
            "content": (
                f"{SUMMARY_REQUEST_MARK} Below are your summary so far (if any) and the "
                "messages that came after it, oldest first; user messages start with the "
                "speaker's name. Write the new summary, replacing the old one: who took part, "
                "what was asked, decided and answered, names, numbers, promises and open "
                f"questions. At most {words} words, plain text, only the summary."
            ),
        }

    def _request(self, source: SummarySource) -> tuple[int, list[Message]]:
        """How many of `source.messages` to fold (0: none can be, see below), and the request
        that folds them, within the context budget. The fold ends before a user message (or
        at the end of the history), so no exchange is split."""
        instructions = self._instructions()
        head = f"Summary so far:\n{source.summary.text}\n\n" if source.summary else ""
        head += "Messages that came after it:\n"
        room = (
            self._budget
            - message_size(instructions)
            - message_size({"role": "user", "content": head})
        )
        messages = source.messages
        max_chars = max(min(LINE_MAX_CHARS, self._budget // 16), 80)
        lines = [transcript_line(m, max_chars) for m in messages]
        cuts = [
            c
            for c in range(1, len(messages) + 1)
            if (
                messages[c].get("role") == "user"
                if c < len(messages)
                else source.next_role in (None, "user")
            )
        ]
        if not cuts:
            return 0, []
        shown = [0]
        for line in lines:
            shown.append(shown[-1] + _json_size(line + "\n"))
        fitting = [c for c in cuts if shown[c] <= room]
        cut = fitting[-1] if fitting else cuts[0]  # one exchange too long whole: cut short
        transcript = "\n".join(lines[:cut])
        while transcript and _json_size(transcript) > room:
            transcript = transcript[: len(transcript) * 9 // 10]
        return cut, [instructions, {"role": "user", "content": head + transcript}]

    async def fold(
        self, scope: str, name: str, model: str, keep: int, account: Account | None = None
    ) -> Summary | None:
        """Fold the oldest uncovered messages of session `name`, all but the newest `keep`,
        into its summary (one model call, as much as fits the budget). Returns the summary
        saved; None when there was nothing to fold or the session moved on (cleared, or
        summarized by another process). `SummaryInProgress` while another holds the lease;
        `SummaryFailed` when the model call failed (nothing changed). The call's tokens
        count in the session's totals and, charged to `account`, in its server's day; they
        are never refused (the limits are checked when a message is admitted)."""
        token = uuid.uuid4().hex
        source = await self._store.begin_summary(
            scope, name, token, self._lease_ms, keep, SUMMARY_ROUND_MESSAGES
        )
        if source is None:
            return None
        try:
            cut, request = self._request(source)
            if not cut:
                await self._store.release_summary(scope, name, token)
                return None
            try:
                async with self._ledger.metered(account, scope, name) as meter:
                    added = await self._model.complete(request, model, (), meter)
            except ModelError as error:
                raise SummaryFailed(str(error).rstrip(".")) from error
            text = _answer(added)
            if not text:
                raise SummaryFailed("the model sent back an empty answer")
            covered = (source.summary.covered if source.summary else 0) + cut
            summary = Summary(_within(text, self.max_bytes), covered, source.positions[cut - 1])
            saved = await self._store.save_summary(scope, token, source, summary)
            return summary if saved else None
        except BaseException:
            with contextlib.suppress(StoreUnavailable):
                await self._store.release_summary(scope, name, token)
            raise

    async def compact(
        self, scope: str, models: ModelChoice | None = None, account: Account | None = None
    ) -> str:
        """`/compact`: fold the whole history of the scope's current session into its
        summary now, so the next answer starts from the summary alone (written by the model
        that answers the session: `models` picks the default for one no longer allowed).
        Its calls are charged to `account`, the person who asked for it."""
        session = await self._store.current_session(scope)
        model = models.usable(session.settings.model) if models else session.settings.model
        folded: Summary | None = None
        for _ in range(COMPACT_ROUNDS):
            summary = await self.fold(scope, session.name, model, keep=0, account=account)
            if summary is None:
                break
            folded = summary
        if folded is not None:
            return (
                f"Summary covers the first {_count(folded.covered)} of this session now; "
                "the next answer starts from it (the messages stay stored)."
            )
        if session.message_count == 0:
            raise InvalidInput("This session has no messages yet; there is nothing to summarize.")
        current = await self._store.read_summary(scope, session.name)
        if current is not None:
            raise InvalidInput(
                f"Nothing new to summarize: the summary covers the first "
                f"{_count(current.covered)} already."
            )
        raise InvalidInput("Nothing to summarize here yet.")


def _answer(added: Sequence[Message]) -> str:
    answers = [m for m in added if m.get("role") == "assistant" and m.get("content")]
    return str(answers[-1]["content"]).strip() if answers else ""


def _within(text: str, max_bytes: int) -> str:
    """`text` cut at a word to at most `max_bytes` stored bytes (a model may overrun)."""
    if _json_size(text) <= max_bytes:
        return text
    cut = text
    while cut and _json_size(cut + " …") > max_bytes:
        cut = cut[: len(cut) * 9 // 10].rsplit(" ", 1)[0]
    return cut + " …"


def _count(n: int) -> str:
    return f"{n} message{'s' if n != 1 else ''}"
