"""Titles for the threads the bot opens, written by the model after the first answer.

A thread is opened with a stand-in name (the session's, or the first words of a mention).
Once it has its first answer, one small model call writes a short title from that exchange,
and the thread is renamed to it: once, by one process, never over a name a person gave it.
The store keeps what makes that so: the name the bot gave the thread when it opened it, and
then that it was titled (swapped atomically, so a retry or a second process never acts).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from bot.model import ModelClient
from bot.store.base import Message, SessionStore
from bot.usage import Account, UsageLedger

TITLE_OPTION = "thread_title"
"""The scope option of a thread the bot opened: `named:` and the name it gave the thread,
until the thread is titled; then `titled`."""
_NAMED = "named:"
TITLED = "titled"
TITLE_PROMPT = (
    "Write a title for the conversation below: at most eight words, in the language of the "
    "question, saying what it is about. Reply with the title only, without quotes."
)
EXCHANGE_CHARS = 1500
"""How much of the question and of the answer the title call is sent: the start is enough,
and the call stays small."""
_MENTION = re.compile(r"<(?:@[!&]?|#)\d+>|@(?:everyone|here)\b")
_QUOTES = str.maketrans("", "", '"`\u201c\u201d\u201e\u00ab\u00bb')
_SINGLE_QUOTES = " '\u2018\u2019"
"""Stripped around the title only: inside it they are apostrophes."""
_LABEL = re.compile(r"^(?:thread\s+)?title\s*:\s*", re.IGNORECASE)


def clean_title(raw: str, limit: int) -> str:
    """The model's title as a thread name: one line, no mentions (`<@id>`, `<@&id>`, `<#id>`,
    @everyone, @here), no quotes or "Title:" label, at most `limit` characters (cut at a
    word when one ends in the second half). Empty when nothing is left."""
    text = _MENTION.sub(" ", raw).translate(_QUOTES)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    text = _LABEL.sub("", text).strip(_SINGLE_QUOTES)
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        text = text[: cut if cut > limit // 2 else limit].rstrip()
    return text


class ThreadTitles:
    """What the store and the model do for thread titles; the Discord glue renames."""

    def __init__(
        self, store: SessionStore, model: ModelClient, clock: Callable[[], float] = time.time
    ) -> None:
        """`clock` (unix seconds) dates the tokens the title calls are charged."""
        self._store = store
        self._model = model
        self._ledger = UsageLedger(store, clock)

    async def opened(self, scope: str, name: str) -> None:
        """Remember the name the bot gave the thread it just opened: it is titled later only
        while it still has that name."""
        await self._store.set_scope_option(scope, TITLE_OPTION, _NAMED + name)

    async def take(self, scope: str) -> str | None:
        """The name the bot gave this thread, when the caller is the one to title it; from
        then on the thread counts as titled, whatever happens next, so it is never titled
        twice. None for a thread that was titled already, or not opened by the bot."""
        value = await self._store.scope_option(scope, TITLE_OPTION)
        if value is None or not value.startswith(_NAMED):
            return None
        if not await self._store.swap_scope_option(scope, TITLE_OPTION, value, TITLED):
            return None
        return value.removeprefix(_NAMED)

    async def write(
        self, scope: str, question: str, answer: str, limit: int, account: Account | None = None
    ) -> str:
        """A title for the exchange, from one call to the session's model (no tools); empty
        when the model wrote nothing usable. Raises `ModelError` as a turn's call does. The
        call's tokens count in the session's totals and, charged to `account` (who asked
        the question), in its server's day; a title is never refused for them."""
        session = await self._store.current_session(scope)
        exchange = f"Question:\n{question[:EXCHANGE_CHARS]}\n\nAnswer:\n{answer[:EXCHANGE_CHARS]}"
        asked: list[Message] = [
            {"role": "system", "content": TITLE_PROMPT},
            {"role": "user", "content": exchange},
        ]
        async with self._ledger.metered(account, scope, session.name) as meter:
            added = await self._model.complete(asked, session.settings.model, (), meter)
        texts = [m["content"] for m in added if m.get("role") == "assistant"]
        written = texts[-1] if texts and isinstance(texts[-1], str) else ""
        return clean_title(written, limit)
