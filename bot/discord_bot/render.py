"""Turning model text into Discord messages: split under the 2,000-character limit at
paragraph or line boundaries, with code blocks closed and reopened across the split, and a
reply that grows as the model streams, edited no faster than Discord allows."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
from collections import deque

import aiohttp
import discord

MESSAGE_LIMIT = 2000
"""Discord's limit for a bot's message content."""
EDIT_INTERVAL_SECONDS = 1.2
"""About one edit a second per message is what Discord tolerates from a streaming bot."""
EDITS_PER_WINDOW = 4
EDIT_WINDOW_SECONDS = 5.0
"""Discord answers a sixth edit of a message within five seconds with 429; keep a margin."""
NO_PINGS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
"""The model's text can never ping @everyone, @here, roles or users; the asker is notified."""
_FENCE = "```"
_CLOSE = f"\n{_FENCE}"
LANGUAGE_MAX_CHARS = 32
"""A reopened code block keeps its language only up to this length, so the prefix carried
into every piece stays small whatever the model writes after a fence."""
_LANGUAGE = re.compile(r"([A-Za-z0-9_+\-.#]+?)(?:\n|$)")
"""Discord's own rule: a fence's language is the word right after it, ended by a newline."""
_NOTHING_TO_SHOW = re.compile(r"[A-Za-z0-9_+\-.#]*\n*")
"""What may follow an opening fence for its block to show nothing yet: a language at most."""

log = logging.getLogger(__name__)


def _fence_after(text: str, open_language: str | None) -> str | None:
    """The code block still open at the end of `text` (its language, "" for none), given the
    one open at its start. Discord opens and closes a block at every ``` wherever it stands
    on a line, so this does the same."""
    at = text.find(_FENCE)
    while at >= 0:
        if open_language is None:
            language = _LANGUAGE.match(text, at + len(_FENCE))
            named = language[1] if language else ""
            open_language = named if len(named) <= LANGUAGE_MAX_CHARS else ""
        else:
            open_language = None
        at = text.find(_FENCE, at + len(_FENCE))
    return open_language


def _cut_point(window: str) -> int:
    """Where to cut: the last paragraph break, else line break, else space, in the back
    half of the window; else the hard limit, moved off a run of backticks when it can be."""
    half = len(window) // 2
    for separator in ("\n\n", "\n", " "):
        at = window.rfind(separator)
        if at > half:
            return at
    cut = len(window)
    while cut > half and window[cut - 1] == "`":
        cut -= 1
    return cut if cut > half else len(window)


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Pieces of at most `limit` characters that read as the whole text. A code block cut
    in two is closed at the end of one piece and reopened (same language) in the next.

    Every piece but the last carries at least half of what fits, so the number of pieces
    stays proportional to the text whatever it holds (a fence followed by a line longer
    than a message once made this loop run forever)."""
    pieces: list[str] = []
    open_language: str | None = None
    rest = text
    while rest:
        prefix = f"{_FENCE}{open_language}\n" if open_language is not None else ""
        if len(prefix) + len(rest) <= limit:
            pieces.append(prefix + rest)
            break
        window = rest[: limit - len(prefix) - len(_CLOSE)]
        cut = _cut_point(window)
        after = _fence_after(rest[:cut], open_language)
        opening = rest.rfind(_FENCE, 0, cut)
        if (
            after is not None
            and opening > len(window) // 2
            and _NOTHING_TO_SHOW.fullmatch(rest, opening + len(_FENCE), cut)
        ):
            # The block opens at the very end of this piece: start the next piece with its
            # fence instead of leaving an empty block behind.
            cut = opening
            after = _fence_after(rest[:cut], open_language)
        piece = rest[:cut]
        pieces.append(prefix + piece + (_CLOSE if after is not None else ""))
        rest = rest[cut:]
        rest = rest[1:] if rest.startswith(" ") else rest.lstrip("\n")
        if after is not None and rest.startswith(_FENCE):
            rest = rest[len(_FENCE) :].lstrip("\n")  # the block ended here: it is closed
            after = None
        open_language = after
    return [p for p in pieces if p.strip()]


Postable = discord.abc.Messageable
Posted = discord.Message | discord.PartialMessage


class LiveReply:
    """An answer in `channel` that follows streaming text: messages are posted and edited at
    most once per `interval`, and `finish` leaves them equal to the final text, split. The
    first message replies to `reference` when given. Given `posted` (the messages of an
    earlier answer, for /retry), it edits those first and deletes the ones left over."""

    def __init__(
        self,
        channel: Postable,
        reference: Posted | None,
        interval: float = EDIT_INTERVAL_SECONDS,
        posted: list[Posted] | None = None,
    ) -> None:
        self._channel = channel
        self._reference = reference
        self._interval = interval
        self._text = ""
        self._posted: list[Posted] = list(posted or [])
        self._shown: list[str | None] = [None] * len(self._posted)
        self._changed = False
        self._last_flush = 0.0
        self._pending: asyncio.Task[None] | None = None
        self._waiting = False
        self._edits: deque[float] = deque()
        self._lock = asyncio.Lock()

    @property
    def started(self) -> bool:
        return bool(self._posted)

    @property
    def changed(self) -> bool:
        """Whether anything was posted or edited yet."""
        return self._changed

    @property
    def message_ids(self) -> list[str]:
        return [str(posted.id) for posted in self._posted]

    async def feed(self, delta: str) -> None:
        """Take a piece of streamed text; the flush happens in the background."""
        self._text += delta
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._flush_when_due())

    async def finish(self, text: str) -> None:
        """Show exactly `text` (the whole answer, with any notes appended)."""
        await self._cancel_pending()
        self._text = text
        await self._flush(final=True)

    async def fail(self, problem: str) -> None:
        """Say what went wrong, after whatever part of the answer was already shown."""
        await self._cancel_pending()
        shown = self._text.strip()
        self._text = f"{shown}\n\n⚠️ {problem}" if shown and self._posted else f"⚠️ {problem}"
        await self._flush()

    async def discard(self) -> int:
        """Delete what was posted of this answer (another process answers the message); how
        many messages that was."""
        await self._cancel_pending()
        async with self._lock:
            count = len(self._posted)
            for posted in self._posted:
                try:
                    await posted.delete()
                except discord.NotFound:
                    pass
                except discord.HTTPException as error:
                    log.warning("could not delete part of a stale answer: HTTP %s", error.status)
                except (aiohttp.ClientError, OSError) as error:
                    log.warning("could not delete part of a stale answer: %s", type(error).__name__)
            self._posted.clear()
            self._shown.clear()
            self._text = ""
        return count

    async def _edit_slot(self) -> None:
        """Wait, if need be, until an edit stays within Discord's edit rate: periodic
        flushes alone stay under it, but the final edit can come right after one."""
        now = time.monotonic()
        while self._edits and self._edits[0] <= now - EDIT_WINDOW_SECONDS:
            self._edits.popleft()
        if len(self._edits) >= EDITS_PER_WINDOW:
            await asyncio.sleep(self._edits[0] + EDIT_WINDOW_SECONDS - now)
        self._edits.append(time.monotonic())

    async def _cancel_pending(self) -> None:
        """Drop a flush still waiting for its turn; let one already talking to Discord end,
        or a message it posted would be posted again."""
        task = self._pending
        if task is None or task.done():
            return
        if self._waiting:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _flush_when_due(self) -> None:
        wait = self._last_flush + self._interval - time.monotonic()
        if wait > 0:
            self._waiting = True
            try:
                await asyncio.sleep(wait)
            finally:
                self._waiting = False
        try:
            await self._flush()
        except discord.HTTPException as error:  # the final flush will try again
            log.warning("streaming edit failed: HTTP %s", error.status)
        except (aiohttp.ClientError, OSError) as error:
            log.warning("streaming edit failed: %s", type(error).__name__)

    async def _flush(self, *, final: bool = False) -> None:
        async with self._lock:
            self._last_flush = time.monotonic()
            self._changed = True
            pieces = split_message(self._text)
            for i, piece in enumerate(pieces):
                if i < len(self._posted):
                    if self._shown[i] != piece:
                        await self._edit_slot()
                        try:
                            await self._posted[i].edit(content=piece, allowed_mentions=NO_PINGS)
                        except discord.NotFound:  # an earlier answer's message, deleted since
                            self._posted[i] = await self._post(piece, i)
                        self._shown[i] = piece
                    continue
                self._posted.append(await self._post(piece, i))
                self._shown.append(piece)
            if final and len(self._posted) > len(pieces):  # an earlier, longer answer's
                surplus = self._posted[len(pieces) :]
                del self._posted[len(pieces) :], self._shown[len(pieces) :]
                for posted in surplus:
                    with contextlib.suppress(discord.NotFound):
                        await posted.delete()

    async def _post(self, piece: str, i: int) -> discord.Message:
        reference = self._reference if i == 0 else None
        return await self._channel.send(
            piece,
            # a question deleted meanwhile still gets its answer, as a plain message
            reference=reference.to_reference(fail_if_not_exists=False)  # type: ignore[arg-type]
            if reference is not None
            else None,
            allowed_mentions=NO_PINGS,
        )


ANSWERED_ELSEWHERE = frozenset({40060, 10062})
"""Discord's codes for an acknowledgement it refused: already acknowledged (by another
process), or unknown interaction (too late: another process took it, or nobody did in 3 s)."""
FORM = "form"
"""Key of a slash command's `extras`: a function of the options given, True when the command
answers with a form (a modal), which must be its first response: such a command is not
acknowledged beforehand, and the form, sent by `show_form`, is the acknowledgement."""
PRIVATE = "private"
"""Key of a slash command's `extras`: True, or a function of the options given, when its
answer is for the person who asked only (lists, views). Read when the command is
acknowledged, so the "thinking" message is already as private as the answer."""


def private_answer(interaction: discord.Interaction) -> bool:
    """Whether the command declares its answer private; an unknown command's is."""
    command = interaction.command
    if command is None:
        return True
    private = command.extras.get(PRIVATE, False)
    return bool(private(interaction.namespace) if callable(private) else private)


def opens_form(interaction: discord.Interaction) -> bool:
    command = interaction.command
    form = command.extras.get(FORM) if command is not None else None
    return bool(form(interaction.namespace)) if callable(form) else False


async def show_form(interaction: discord.Interaction, form: discord.ui.Modal) -> None:
    """Answer with `form`, unless another process answered the interaction first (Discord
    takes one acknowledgement): then this process stays silent, as for other commands. The
    form's submission comes back to this process only (discord.py routes it to the form)."""
    try:
        await interaction.response.send_modal(form)
    except discord.HTTPException as error:
        if error.code not in ANSWERED_ELSEWHERE:
            raise
        form.stop()
        log.debug("interaction %s answered elsewhere (%s)", interaction.id, error.code)


async def respond(
    interaction: discord.Interaction, text: str, *, ephemeral: bool | None = None
) -> None:
    """Answer a slash command, in several messages when the text is long.

    The command was acknowledged first ("thinking", public or private as the command
    declares), and the first piece replaces that message. `ephemeral=None` answers as the
    acknowledgement did; `ephemeral=True` after a public acknowledgement (bad input, a
    failure) deletes the public "thinking" message first, so the reason is shown only to
    the person who asked."""
    pieces = split_message(text) or ["(nothing to show)"]
    if not interaction.response.is_done():
        private = bool(ephemeral)
        await interaction.response.send_message(
            pieces.pop(0), ephemeral=private, allowed_mentions=NO_PINGS
        )
    else:
        acknowledged_privately = bool(interaction.extras.get(PRIVATE))
        private = acknowledged_privately if ephemeral is None else ephemeral
        if private and not acknowledged_privately:
            await interaction.delete_original_response()
    for piece in pieces:
        await interaction.followup.send(piece, ephemeral=private, allowed_mentions=NO_PINGS)


async def respond_with_file(
    interaction: discord.Interaction, text: str, filename: str, data: bytes
) -> None:
    """Answer a private command with one line and a file, shown only to the person who
    asked; the file replaces the private "thinking" message. Whatever its size, it goes as
    a file, never as chat text."""
    file = discord.File(io.BytesIO(data), filename)
    if interaction.response.is_done():
        await interaction.followup.send(text, file=file, ephemeral=True, allowed_mentions=NO_PINGS)
    else:
        await interaction.response.send_message(
            text, file=file, ephemeral=True, allowed_mentions=NO_PINGS
        )
