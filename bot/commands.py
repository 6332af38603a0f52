"""The session commands of the reference (`/new /list /load /clear /model /mcp /status`),
`/compact`, and `/delete` and `/forget-channel` for deleting what is stored, as plain async
functions over a store. Discord and the console both call these and show the text they
return; bad input raises an `InvalidInput` and changes nothing."""

from __future__ import annotations

import re
import time
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from bot.context import speaker_of
from bot.errors import CorruptSession, DamagedState, InvalidInput, InvalidMcpServer, UnknownModel
from bot.exports import Exported, export_session
from bot.model import ModelChoice
from bot.store.base import (
    PERSONA_OPTION,
    Exchange,
    Message,
    SessionInfo,
    SessionSettings,
    SessionStore,
    Summary,
    checked_session_name,
)
from bot.usage import (
    USAGE_REPORT_DAYS,
    Account,
    day_of,
    days_back,
    describe_server_usage,
    describe_session_usage,
)

if TYPE_CHECKING:
    from bot.summary import Summarizer


class ReplyMode(StrEnum):
    """When the bot answers in a shared place (DMs and its own threads: always)."""

    MENTIONS = "mentions"
    ALL = "all"
    THREADS = "threads"


REPLY_MODE_OPTION = "reply_mode"
REPLY_MODE_HELP = {
    ReplyMode.MENTIONS: "answers when mentioned or replied to",
    ReplyMode.ALL: "answers every message",
    ReplyMode.THREADS: "opens a thread for each mention and continues there",
}

CHANNEL_CONTEXT_OPTION = "channel_context"
CHANNEL_CONTEXT_HELP = {
    True: "a mention also shows the model the messages since the bot's last answer here",
    False: "the model sees only what is addressed to the bot",
}

MCP_SERVERS_MAX = 10
MCP_ENTRY_MAX = 300
_SLUG = re.compile(r"[\w-]+/[\w-]+(@[\w.-]+)?", re.ASCII)
"""The SDK's own slug rule (`org/name`), with an optional version."""


def checked_mcp_server(raw: str) -> str:
    """A marketplace slug (`org/name`, `org/name@version`) or an `https://` URL without
    credentials. Entries end up in /status and in requests, so anything else is refused."""
    entry = raw.strip()
    if not entry:
        raise InvalidMcpServer("Give an MCP server: a slug like `org/name` or an https:// URL.")
    if len(entry) > MCP_ENTRY_MAX:
        raise InvalidMcpServer(f"That MCP server entry is longer than {MCP_ENTRY_MAX} characters.")
    if any(c.isspace() or not c.isprintable() for c in entry):
        raise InvalidMcpServer("An MCP server entry cannot contain spaces or control characters.")
    if "://" not in entry:
        if _SLUG.fullmatch(entry):
            return entry
        raise InvalidMcpServer(
            "Not a marketplace slug: use `org/name` or `org/name@version` "
            "(letters, digits, '-' and '_'), or an https:// URL."
        )
    url = urllib.parse.urlsplit(entry)
    if url.scheme.lower() != "https":
        raise InvalidMcpServer("Only https:// URLs are accepted for MCP servers.")
    if url.username is not None or url.password is not None:
        raise InvalidMcpServer(
            "MCP server URLs with credentials are refused: they would be stored and shown."
        )
    try:
        url.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise InvalidMcpServer("That MCP server URL has an invalid port.") from None
    if not url.hostname:
        raise InvalidMcpServer("That MCP server URL has no host.")
    if not entry.isascii():
        raise InvalidMcpServer("Write the MCP server URL in ASCII (punycode for the host).")
    return "https://" + entry[len("https://") :]  # the SDK recognises URLs by this prefix


PERSONA_MAX_CHARS = 4000
"""The longest persona: a Discord modal's text field holds as much, and it leaves the
default context budget (64,000 characters) most of its room for the conversation."""
PERSONA_PREVIEW_CHARS = 80
"""How much of a persona `/status` shows."""
_ALLOWED_CONTROLS = frozenset("\n\t")


def checked_persona(raw: str) -> str:
    """A persona as it will be stored and sent: trimmed, line breaks as `\n`. Refused when
    empty, longer than `PERSONA_MAX_CHARS`, or holding control characters other than line
    breaks and tabs (invisible in /persona show, and unreadable to some providers)."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise InvalidInput("A persona cannot be empty; /persona clear returns to the default.")
    if len(text) > PERSONA_MAX_CHARS:
        raise InvalidInput(
            f"A persona is at most {PERSONA_MAX_CHARS} characters; this one has {len(text)}. "
            "Nothing was changed."
        )
    if any(
        (unicodedata.category(c) == "Cc" and c not in _ALLOWED_CONTROLS)
        or unicodedata.category(c) == "Cs"
        for c in text
    ):
        raise InvalidInput(
            "A persona cannot contain control characters (line breaks and tabs are fine). "
            "Nothing was changed."
        )
    return text


def persona_preview(persona: str) -> str:
    """One short line of a persona, for /status and the replies of /persona."""
    line = " ".join(persona.split())
    if len(line) <= PERSONA_PREVIEW_CHARS:
        return line
    return line[: PERSONA_PREVIEW_CHARS - 1].rstrip() + "…"


@dataclass(frozen=True)
class Parent:
    """The place a thread inherits its persona from, and how to name it to users."""

    scope: str
    label: str
    """Such as "parent channel #general"."""


@dataclass(frozen=True)
class PersonaInEffect:
    """The persona a place's turns use: its own, its parent's, or none (the default)."""

    text: str | None
    source: str
    """Where it comes from, for users: "this thread", "parent channel #general", "default"."""


@dataclass(frozen=True)
class Commands:
    """The command set bound to a store, the allowed models and the default one
    (`DEFAULT_MODEL`, for a session whose settings cannot be read), and the engine's
    summarizer (for `/compact`)."""

    store: SessionStore
    allowed_models: tuple[str, ...]
    default_model: str
    summarizer: Summarizer | None = None

    @property
    def models(self) -> ModelChoice:
        return ModelChoice(self.allowed_models, self.default_model)

    clock: Callable[[], float] = field(default=time.time)
    """Unix seconds: which day's usage is today's."""

    async def new(self, scope: str, name: str | None = None) -> str:
        """Start an empty session, keeping the current model and MCP servers (as the
        reference does: they are the user's settings, not the session's history)."""
        try:
            settings = (await self.store.current_session(scope)).settings
        except (CorruptSession, DamagedState):  # /new is a way out of both
            settings = SessionSettings(self.default_model)
        settings = replace(settings, model=self.models.usable(settings.model))
        if name is None or not name.strip():
            try:
                taken = {s.name for s in await self.store.list_sessions(scope)}
            except DamagedState:
                taken = set()
            name = next(f"chat-{n}" for n in range(1, len(taken) + 2) if f"chat-{n}" not in taken)
        created = await self.store.create_session(scope, checked_session_name(name), settings)
        return f"Started new session: {created.name}"

    async def list(self, scope: str) -> str:
        sessions = await self.store.list_sessions(scope)
        if not sessions:
            return "Sessions: (none yet; the first message starts `default`)"
        try:
            current = (await self.store.current_session(scope)).name
        except CorruptSession as error:
            current = error.name
        lines = [
            f"{'*' if s.name == current else ' '} {s.name} "
            + (f"({_count(s.message_count)})" if s.readable else "(unreadable: /load, then /clear)")
            for s in sessions
        ]
        return "Sessions:\n" + "\n".join(lines)

    async def load(self, scope: str, name: str) -> str:
        session = await self.store.switch_session(scope, checked_session_name(name))
        return f"Loaded session: {session.name} ({_count(session.message_count)})"

    async def clear(self, scope: str) -> str:
        session = await self.store.clear_session(scope)
        return f"Cleared session: {session.name}"

    async def compact(self, scope: str, account: Account | None = None) -> str:
        """Fold the current session's whole history into its summary now; its tokens are
        charged to `account`, the person who asked for it."""
        if self.summarizer is None:
            raise InvalidInput("Summaries are not available here.")
        return await self.summarizer.compact(scope, self.models, account)

    async def delete(self, scope: str, name: str) -> str:
        """Delete a session and everything stored with it; deleting the current one leaves
        the place a fresh empty session. An answer being written in it is shown but not kept."""
        wanted = checked_session_name(name)
        fresh = await self.store.delete_session(scope, wanted)
        said = f"Deleted session {wanted} and everything stored with it."
        return f"{said} Now in a fresh empty session: {fresh}" if fresh else said

    async def forget_place(self, scope: str, confirmation: str, place_name: str) -> str:
        """Delete everything stored for this place, once `confirmation` repeats its name
        (a leading '#' and letter case aside): such a deletion is not undone."""
        typed = confirmation.strip().removeprefix("#").strip()
        if typed.casefold() != place_name.casefold():
            raise InvalidInput(
                f"Nothing was deleted: to confirm, give this place's name, {place_name}, exactly."
            )
        count = await self.store.forget_place(scope)
        return (
            f"Deleted everything stored for {place_name}: {_count_sessions(count)} with their "
            "messages and settings, and its /mode and persona. The next message starts a fresh "
            "session."
        )

    def resolve_model(self, choice: str) -> str:
        """A number from the model list or an allowed name (case-insensitive)."""
        wanted = choice.strip()
        if wanted.isascii() and wanted.isdigit() and 1 <= int(wanted) <= len(self.allowed_models):
            return self.allowed_models[int(wanted) - 1]
        for model in self.allowed_models:
            if model.lower() == wanted.lower():
                return model
        raise UnknownModel(wanted, self.allowed_models)

    async def model(self, scope: str, choice: str | None = None) -> str:
        current = await self.store.current_session(scope)
        if choice is None or not choice.strip():
            in_use = self.models.usable(current.settings.model)
            lines = [
                f"  {'*' if m == in_use else ' '} {i}. {m}"
                for i, m in enumerate(self.allowed_models, 1)
            ]
            return "Available models:\n" + "\n".join(lines)
        model = self.resolve_model(choice)
        await self.store.update_settings(scope, replace(current.settings, model=model))
        return f"Switched to: {model}"

    async def mcp_list(self, scope: str) -> str:
        servers = (await self.store.current_session(scope)).settings.mcp_servers
        return f"Active MCP servers: {', '.join(servers) if servers else 'None'}"

    async def mcp_add(self, scope: str, entry: str) -> str:
        server = checked_mcp_server(entry)
        settings = (await self.store.current_session(scope)).settings
        if server in settings.mcp_servers:
            raise InvalidInput(f"MCP server {server} is already active.")
        if len(settings.mcp_servers) >= MCP_SERVERS_MAX:
            raise InvalidInput(f"At most {MCP_SERVERS_MAX} MCP servers; remove one first.")
        servers = (*settings.mcp_servers, server)
        await self.store.update_settings(scope, replace(settings, mcp_servers=servers))
        return f"Added MCP server: {server}"

    async def mcp_remove(self, scope: str, entry: str) -> str:
        settings = (await self.store.current_session(scope)).settings
        server = entry.strip()
        if server not in settings.mcp_servers:
            raise InvalidInput(f"MCP server {server[:MCP_ENTRY_MAX]!r} is not active.")
        servers = tuple(s for s in settings.mcp_servers if s != server)
        await self.store.update_settings(scope, replace(settings, mcp_servers=servers))
        return f"Removed MCP server: {server}"

    async def mcp_clear(self, scope: str) -> str:
        settings = (await self.store.current_session(scope)).settings
        await self.store.update_settings(scope, replace(settings, mcp_servers=()))
        return "Cleared MCP servers"

    async def status(
        self,
        scope: str,
        here: str = "this place",
        parent: Parent | None = None,
        server: str | None = None,
    ) -> str:
        """The session's state, and the persona in effect (`here` names the place itself);
        with the `server` the place belongs to, the session's tokens too."""
        session = await self.store.current_session(scope)
        persona = await self.persona_in_effect(scope, here, parent)
        if persona.text is None:
            line = "Persona: default"
        else:
            line = f"Persona ({persona.source}): {persona_preview(persona.text)}"
        summary = await self.store.read_summary(scope, session.name)
        lines = [describe_status(session, summary, self.models), line]
        if server is not None:
            today = day_of(self.clock())
            usage = await self.store.session_usage(scope, session.name, server, today)
            lines += describe_session_usage(usage, server)
        return "\n".join(lines)

    async def persona_in_effect(
        self, scope: str, here: str = "this place", parent: Parent | None = None
    ) -> PersonaInEffect:
        """The place's own persona, else its parent's (a thread's channel), else none."""
        own = await self.store.scope_option(scope, PERSONA_OPTION)
        if own:
            return PersonaInEffect(own, here)
        if parent is not None:
            inherited = await self.store.scope_option(parent.scope, PERSONA_OPTION)
            if inherited:
                return PersonaInEffect(inherited, parent.label)
        return PersonaInEffect(None, "default")

    async def own_persona(self, scope: str) -> str | None:
        """The place's own persona (not one it inherits), to edit it."""
        return await self.store.scope_option(scope, PERSONA_OPTION) or None

    async def set_persona(self, scope: str, text: str) -> str:
        persona = checked_persona(text)
        await self.store.set_scope_option(scope, PERSONA_OPTION, persona)
        return (
            f"Persona set ({len(persona)} characters); the next message here uses it: "
            f"{persona_preview(persona)}"
        )

    async def clear_persona(self, scope: str, parent: Parent | None = None) -> str:
        had = await self.store.scope_option(scope, PERSONA_OPTION)
        await self.store.set_scope_option(scope, PERSONA_OPTION, None)
        now = await self.persona_in_effect(scope, parent=parent)
        after = "the default" if now.text is None else f"the persona of the {now.source}"
        if not had:
            return f"This place had no persona of its own; it uses {after}."
        return f"Persona cleared; the next message here uses {after}."

    async def show_persona(
        self, scope: str, here: str = "this place", parent: Parent | None = None
    ) -> str:
        persona = await self.persona_in_effect(scope, here, parent)
        if persona.text is None:
            return "No persona here: the bot's default system prompt applies."
        return f"Persona from {persona.source} ({len(persona.text)} characters):\n{persona.text}"

    async def export(self, scope: str, choice: str, max_bytes: int | None = None) -> Exported:
        """The current session as a file, in the chosen format (see `bot.exports`)."""
        return await export_session(self.store, scope, choice, max_bytes)

    async def usage(self, server: str, mention: str) -> str:
        """`/usage`: the server's tokens today and lately, and its top users (each shown
        with `mention`, a format for the user id)."""
        days = days_back(self.clock(), USAGE_REPORT_DAYS)
        return describe_server_usage(await self.store.server_usage(server, days), mention)

    async def reply_mode(self, scope: str) -> ReplyMode:
        stored = await self.store.scope_option(scope, REPLY_MODE_OPTION)
        return ReplyMode(stored) if stored in set(ReplyMode) else ReplyMode.MENTIONS

    async def set_reply_mode(self, scope: str, choice: str) -> str:
        try:
            mode = ReplyMode(choice.strip().lower())
        except ValueError:
            raise InvalidInput(
                f"Unknown mode {choice[:40]!r}. Choose one of: {', '.join(ReplyMode)}."
            ) from None
        await self.store.set_scope_option(scope, REPLY_MODE_OPTION, mode.value)
        return f"Reply mode: {mode.value} (the bot {REPLY_MODE_HELP[mode]})."

    async def channel_context(self, scope: str, parent: str | None = None) -> bool:
        """Whether a mention in `scope` brings the place's recent messages along (on unless
        an admin switched it off); a thread without a setting of its own follows `parent`."""
        stored = await self.store.scope_option(scope, CHANNEL_CONTEXT_OPTION)
        if stored is None and parent is not None:
            stored = await self.store.scope_option(parent, CHANNEL_CONTEXT_OPTION)
        return stored != "off"

    async def set_channel_context(self, scope: str, choice: str) -> str:
        wanted = choice.strip().lower()
        if wanted not in ("on", "off"):
            raise InvalidInput(f"Unknown choice {choice[:40]!r}. Choose on or off.")
        await self.store.set_scope_option(scope, CHANNEL_CONTEXT_OPTION, wanted)
        return f"Channel context: {wanted} ({CHANNEL_CONTEXT_HELP[wanted == 'on']})."


def describe_status(
    session: SessionInfo, summary: Summary | None = None, models: ModelChoice | None = None
) -> str:
    """The session's state; with `models`, the model that answers it (the default when its
    own is no longer allowed, with a note saying so)."""
    servers = session.settings.mcp_servers
    used = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(session.updated_at))
    covered = (
        f"covers the first {_count(summary.covered)} (they stay stored; the model sees the "
        "summary instead)"
        if summary
        else "none (nothing summarized yet)"
    )
    stored = session.settings.model
    note = models.retired_note(stored) if models is not None else None
    lines = [
        f"Session: {session.name}",
        f"Model: {models.usable(stored) if models is not None else stored}",
        f"MCP Servers: {', '.join(servers) if servers else 'None'}",
        f"Messages: {session.message_count}",
        f"Summary: {covered}",
        f"Last used: {used if session.updated_at else 'never'}",
    ]
    return "\n".join([*lines, f"Note: {note}"] if note else lines)


QUOTE_MAX_CHARS = 80
"""/undo and /retry name the question they acted on by at most this much of its text."""


def question_quote(message: Message) -> str:
    """A short quote of a stored question: its text, without the speaker's label, on one
    line."""
    text = " ".join(speaker_of(message)[1].split())
    if len(text) > QUOTE_MAX_CHARS:
        text = text[: QUOTE_MAX_CHARS - 1].rstrip() + "…"
    return f"“{text}”" if text else "a message without text"


def describe_undone(exchange: Exchange) -> str:
    return (
        f"Undone: {question_quote(exchange.user)} and its answer are no longer part of this "
        "conversation (the messages stay in the channel)."
    )


def describe_retried(exchange: Exchange) -> str:
    return f"Answered {question_quote(exchange.user)} again."


def _count(n: int) -> str:
    return f"{n} message{'s' if n != 1 else ''}"


def _count_sessions(n: int) -> str:
    return f"{n} session{'s' if n != 1 else ''}"
