"""Errors a user or the outside world can cause, each carrying the one line a user is shown.

The core raises these; the Discord handlers and the console print `str(error)` and nothing
else, so the wording lives here and no traceback or secret reaches a reply.
"""

from __future__ import annotations


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable


class BotError(Exception):
    """Base of every error whose message is safe and meant to be shown to a user."""


class InvalidInput(BotError):
    """A command argument was refused; nothing was changed."""


class UnknownModel(InvalidInput):
    def __init__(self, name: str, allowed: tuple[str, ...]) -> None:
        choices = ", ".join(f"{i}. {m}" for i, m in enumerate(allowed, 1))
        super().__init__(f"Unknown model {name[:100]!r}. Choose one of: {choices}")


class InvalidMcpServer(InvalidInput):
    pass


class InvalidSessionName(InvalidInput):
    pass


class UnknownSession(InvalidInput):
    pass


def _kb(size: int) -> int:
    """Bytes as whole KB, rounded up (so a size over a limit never shows as equal to it)."""
    return -(-size // 1024)


class MessageTooLarge(InvalidInput):
    """A message over the stored size one message may have (`MESSAGE_CAP_KB`)."""

    def __init__(
        self,
        size: int,
        cap: int,
        subject: str = "Your message (with its files)",
        advice: str = "nothing was sent or stored. Send less text or fewer files.",
    ) -> None:
        super().__init__(
            f"{subject} is {_kb(size)} KB, over the limit of {_kb(cap)} KB per message; {advice}"
        )
        self.size = size


class SessionLimit(InvalidInput):
    """A place already keeps as many sessions as it may (`SESSIONS_PER_PLACE`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"This place already has {limit} sessions, the most it may keep; nothing was "
            "created. Reuse one: /load it, then /clear it."
        )


class StoreUnavailable(BotError):
    def __init__(self) -> None:
        super().__init__(
            "Storage is unavailable right now; nothing was changed. Try again shortly."
        )


class CorruptSession(BotError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"Session {name!r} cannot be read (damaged or from an unknown version). "
            "Use /new to start another session or /clear to reset this one."
        )
        self.name = name


class DamagedState(BotError):
    """The place's own stored state (not a session) holds junk; `/clear` or `/new` drop it."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"This channel's stored state is damaged ({what}); /clear or /new repairs it."
        )


class SessionBusy(BotError):
    def __init__(self) -> None:
        super().__init__("This conversation is busy with another message; try again in a moment.")


class ModelError(BotError):
    """The model call failed; the turn was not saved, so the message can simply be sent again.
    `kind` is one word for the metrics (timeout, rate_limited, ...): never the message."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class SummaryInProgress(BotError):
    """Another turn or process is writing this session's summary (the store's lease)."""

    def __init__(self) -> None:
        super().__init__(
            "A summary of this conversation is being written right now; try again in a minute."
        )


class SummaryFailed(ModelError):
    """The summary call failed: nothing changed, and the older messages are cut as before."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"The summary could not be written ({reason}); nothing was changed.")


class NothingToRewrite(InvalidInput):
    """/retry or /undo where the session's last message is not an answered question."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"There is nothing to {action} here: {reason}; nothing was changed.")


class NotYourExchange(InvalidInput):
    def __init__(self, action: str) -> None:
        super().__init__(
            f"Only the person who asked the last question, or a member with Manage Server, "
            f"may {action} it; nothing was changed."
        )


class ExchangeChanged(BotError):
    """The session changed under a /retry or /undo (a clear, a deletion, a takeover), which
    therefore changed nothing."""

    def __init__(self, action: str, *, cleared: bool = False) -> None:
        why = "was cleared" if cleared else "changed"
        super().__init__(
            f"This conversation {why} while the {action} ran; nothing was changed. Try again."
        )
