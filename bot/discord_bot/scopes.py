"""Where a Discord conversation lives: every channel, thread and DM has its own channel ID,
so that ID alone names the scope (a thread never shares its parent's history)."""

from __future__ import annotations


def scope_for(channel_id: int) -> str:
    return f"discord:{channel_id}"
