"""A process's copy of the newest messages of the sessions it serves.

Loading the whole window that fits the context budget on every turn (about 160 messages
by default) costs more than everything else in a turn together. Most turns of a session
are served by the process that served its last one, which already holds that window; so
each process keeps it, and a turn asks Redis only for what was added since.

What makes the copy safe to reuse: every session's meta holds a *generation*, replaced
whenever its history changes other than by appending (created, cleared, a message
forgotten, imported), and a *sequence*, raised by every append by the number of messages
appended. A copy taken at (generation, sequence) is still a prefix of the stored history
when the generation is unchanged; the messages after its sequence are then all that is
new. Below the history cap the stored length must also have grown by exactly those, which
catches writes that bypassed the store (an older bot version, a hand edit). The store
checks all of this inside the same script that takes the lock, so the answer cannot go
stale before the turn uses it.

Memory is bounded: the least recently used sessions are dropped beyond `max_bytes`,
counting each message's stored size plus what it takes as Python objects.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from bot.store.base import Message, newest_fitting, sendable_as_stored

MESSAGE_OVERHEAD_BYTES = 320
"""Memory a cached message takes beyond its stored size: its dict, its strings, its place
in a window's tuples. Measured with tracemalloc (Python 3.11): 307 bytes for a text
message, 340 for a tool result; an assistant tool call takes about 830, a message with an
image about 1,040. Without it, short chat lines would take several times the bound."""


@dataclass(frozen=True)
class RecentWindow:
    """The newest messages of one session, oldest first, with their stored sizes, as of the
    session's (generation, sequence).

    Either `complete` (the session's whole history) or it holds every message that fits
    `bound` bytes counting from the newest: the message before the first one held would
    not have fit. Windows are values: a turn extends the one it started from into a new
    one, so a window never changes under a turn that is using it.
    """

    name: str
    generation: str
    sequence: int
    count: int
    """How many messages the session stored at `sequence` (a check against stray writes)."""
    bound: int
    complete: bool
    messages: tuple[Message, ...] = ()
    sizes: tuple[int, ...] = ()
    size: int = 0
    rewritten: tuple[int, ...] = ()
    """Positions of the messages that are not `sendable_as_stored` (usually none)."""

    def can_serve(self, room: int) -> bool:
        return self.complete or room <= self.bound

    def newest_within(self, room: int) -> tuple[list[Message], int, bool]:
        """The longest tail whose stored size fits `room`, its size, and whether all of its
        messages are `sendable_as_stored`."""
        start, used = 0, self.size
        if self.size > room:
            count, used = newest_fitting(reversed(self.sizes), room)
            start = len(self.sizes) - count
        as_stored = not self.rewritten or self.rewritten[-1] < start
        return list(self.messages[start:]), used, as_stored

    def extended(
        self, messages: Sequence[Message], sizes: Sequence[int], sequence: int, count: int
    ) -> RecentWindow:
        """This window with messages appended after it (the session now at `sequence`,
        with `count` stored). The oldest are dropped where the history cap dropped them,
        and beyond the bound, so the window can still serve any room up to the bound."""
        if not messages and sequence == self.sequence and count == self.count:
            return self  # nothing new (the common load): the same window, not a copy of it
        held = len(self.messages)
        rewritten = self.rewritten
        if not all(map(sendable_as_stored, messages)):
            rewritten += tuple(
                held + i for i, m in enumerate(messages) if not sendable_as_stored(m)
            )
        all_messages = self.messages + tuple(messages)
        all_sizes = self.sizes + tuple(sizes)
        size = self.size + sum(sizes)
        start = max(len(all_messages) - count, 0)  # the history cap dropped the oldest
        if start:
            size -= sum(all_sizes[:start])
        while size > self.bound:
            size -= all_sizes[start]
            start += 1
        if start:
            all_messages, all_sizes = all_messages[start:], all_sizes[start:]
            rewritten = tuple(i - start for i in rewritten if i >= start)
        return RecentWindow(  # not `dataclasses.replace`: a third of this on every turn
            self.name,
            self.generation,
            sequence,
            count,
            self.bound,
            self.complete and len(all_messages) == count,
            all_messages,
            all_sizes,
            size,
            rewritten,
        )


class RecentCache:
    """Windows by scope (one per scope: its current session), least recently used first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._windows: OrderedDict[str, RecentWindow] = OrderedDict()
        self._size = 0

    def get(self, scope: str) -> RecentWindow | None:
        window = self._windows.get(scope)
        if window is not None:
            self._windows.move_to_end(scope)
        return window

    def put(self, scope: str, window: RecentWindow) -> None:
        if self._windows.get(scope) is window:  # kept as it was: now the most recent
            self._windows.move_to_end(scope)
            return
        self.drop(scope)
        if _memory(window) > self.max_bytes or self.max_bytes == 0:
            return
        self._windows[scope] = window
        self._size += _memory(window)
        self._evict()

    def drop(self, scope: str) -> None:
        window = self._windows.pop(scope, None)
        if window is not None:
            self._size -= _memory(window)

    def _evict(self) -> None:
        while self._size > self.max_bytes and self._windows:
            _, oldest = self._windows.popitem(last=False)
            self._size -= _memory(oldest)

    @property
    def size(self) -> int:
        """Memory the cached messages take (as `_memory` counts it)."""
        return self._size

    def __len__(self) -> int:
        return len(self._windows)


def _memory(window: RecentWindow) -> int:
    return window.size + MESSAGE_OVERHEAD_BYTES * len(window.messages)
