"""Where a Discord conversation lives: every channel, thread and DM has its own channel ID,
so that ID alone names the scope (a thread never shares its parent's history)."""

from __future__ import annotations

_PREFIX = "discord:"


def scope_for(channel_id: int) -> str:
    return f"{_PREFIX}{channel_id}"


def channel_of(scope: str) -> int | None:
    """The channel a scope belongs to; None for a scope that is not Discord's (the console)."""
    rest = scope.removeprefix(_PREFIX)
    return int(rest) if rest != scope and rest.isdigit() else None
