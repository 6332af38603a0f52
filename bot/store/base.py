"""The session store's contract, shared by the Redis and SQLite backends.

A *scope* is one place a conversation happens (a Discord channel, thread or DM, or the
console's user). It points at its *current* session and knows its other sessions by name. A
session holds OpenAI-format messages exactly as the SDK returns them, plus its model and MCP
servers.

A turn is two calls so a backend can do each in one round trip: `begin_turn` takes the
session's lock and returns the newest messages that fit the context budget; `finish_turn`
appends what the turn added and releases the lock, atomically. A failed turn calls
`finish_turn` with nothing to add, which only releases the lock.

Turns of one scope go in the order of their tickets, whichever process holds them: a turn
waits in the scope's queue until it is first and the lock is free. A ticket may carry a
claim (a Discord message id): a claim can start a turn only once, so a message delivered
twice, or to two processes, is answered once. A claim is a lease while its turn runs (as long
as the lock, renewed with it) and lasts a day once the message is answered, with an answer or
with an error the user was shown: a process that dies mid-turn leaves a lease that lapses,
and another process takes the message over.
"""

from __future__ import annotations

import json
import os
import re
import string
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.errors import CorruptSession, InvalidSessionName, MessageTooLarge
from bot.usage import Admission, Charge, Refusal, ServerUsage, SessionUsage

Message = dict[str, Any]

DEFAULT_SESSION = "default"
SESSION_NAME_MAX = 100
"""Discord's autocomplete (how /load offers names) holds at most 100 characters a choice."""
STORED_NAME_MAX_BYTES = 4 * SESSION_NAME_MAX
"""The longest stored form of a name (`stored_name`): 3 bytes for an escaped ASCII character,
at most 4 for any other."""
STORE_FORMAT = "1"
"""Stored sessions carry this; a session with another value is refused as unreadable."""


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""What `json.dumps` with these options builds on every call: made once (a turn measures and
stores several messages)."""


_MAKE_ENCODER: Callable[..., Callable[[Any, int], list[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
"""The C encoder `_ENCODER.encode` ends in, called here directly with the same arguments (a
message is measured a few times a turn; the two Python calls before it cost half as much)."""


def encode_message(message: Message) -> str:
    """The one serialization of a stored message; its length is what the budget counts."""
    if _MAKE_ENCODER is None or type(message) is not dict:
        return _ENCODER.encode(message)
    encoder = _MAKE_ENCODER(
        {}, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    return "".join(encoder(message, 0))


def stored_bytes(text: str) -> int:
    """A stored text's size in bytes (UTF-8), without encoding it when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode())


def message_size(message: Message) -> int:
    return stored_bytes(encode_message(message))


def newest_fitting(sizes_newest_first: Iterable[int], budget_bytes: int) -> tuple[int, int]:
    """How many of the newest messages fit the budget, and their stored size: the one cut
    that the context and the stores make (the Redis scripts make it in Lua)."""
    count = used = 0
    for size in sizes_newest_first:
        if used + size > budget_bytes:
            break
        used += size
        count += 1
    return count, used


def sendable_as_stored(message: Message) -> bool:
    """Neither a stored system message nor one with content parts (images): the model may
    be sent it exactly as stored, with no rewriting (see `bot.context`)."""
    return message.get("role") != "system" and type(message.get("content")) is not list


def readable_name(stored: object) -> bool:
    """Whether a stored session name (see `stored_name`) can be used to find the session (a
    store holding junk there reports the place as damaged); the Redis scripts'
    `readable_name` is its twin, so the checks are on ASCII, as Lua's are."""
    return (
        isinstance(stored, str)
        and 0 < len(stored.encode()) <= STORED_NAME_MAX_BYTES
        and not any(c in _UNREADABLE_IN_STORED for c in stored)
    )


_KEPT_IN_STORED = frozenset(string.ascii_letters + string.digits + "_.-")
_UNREADABLE_IN_STORED = frozenset(
    string.whitespace + ":{}" + "".join(map(chr, range(32))) + chr(127)
)
_ESCAPED = re.compile(r"%([0-7][0-9A-F])")
_STORED_AS_IS = re.compile(r"[A-Za-z0-9_.\-\x80-\U0010ffff]*")
"""A name every character of which `stored_name` keeps: most names, checked on every turn."""


def stored_name(name: str) -> str:
    """A session name as the stores keep it (inside Redis keys, in SQLite rows): ASCII other
    than letters, digits, '_', '.' and '-' is written `%XX`; other characters stay as they
    are. Names of the first alphabet (`[\\w.-]+`) are stored unchanged, so data stored before
    any other name was allowed reads the same, and the rule depends on no Unicode version,
    so every process finds the same key for a name."""
    if _STORED_AS_IS.fullmatch(name):
        return name
    return "".join(c if c in _KEPT_IN_STORED or ord(c) > 127 else f"%{ord(c):02X}" for c in name)


def shown_name(stored: str) -> str:
    """The session name a person gave, from its stored form (`stored_name`)."""
    if "%" not in stored:
        return stored
    return _ESCAPED.sub(lambda escape: chr(int(escape.group(1), 16)), stored)


def session_name_problem(name: str) -> str | None:
    """Why `name` (as given, not stripped) cannot name a session, or None. Any name the
    reference's `/new <name>` makes is accepted, spaces, ':', '@' and emoji included."""
    if not name:
        return "A session name cannot be empty."
    if name != name.strip():
        return "A session name cannot start or end with a space (commands could not name it)."
    if len(name) > SESSION_NAME_MAX:
        return (
            f"A session name is at most {SESSION_NAME_MAX} characters "
            "(Discord shows no longer name in /load's choices)."
        )
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in name):
        return (
            "A session name cannot contain control characters, line breaks or lone "
            "surrogates (they would garble /list and the terminal)."
        )
    return None


_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
"""Control characters, lone surrogates (not storable as UTF-8) and line separators."""


def checked_session_name(raw: str) -> str:
    """A session name typed in a command (surrounding spaces dropped), or `InvalidSessionName`
    saying why it cannot be one."""
    name = raw.strip()
    problem = session_name_problem(name)
    if problem is not None:
        raise InvalidSessionName(problem)
    return name


@dataclass(frozen=True)
class SessionSettings:
    model: str
    mcp_servers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SessionInfo:
    name: str
    settings: SessionSettings
    message_count: int
    created_at: float
    updated_at: float
    readable: bool = True
    """False for a session listed by name only, its stored summary being unreadable."""


TICKET_TTL_MS = 5_000
"""A waiting turn renews its place at every poll; a dead waiter's place lapses after this."""
FORGOTTEN_TTL_SECONDS = 3_600
"""How long a deleted message that was not stored (yet) is remembered, so a turn still
answering it stores neither it nor its answer (a turn waits and runs well within this)."""
CLAIM_TTL_SECONDS = 86_400
"""How long an answered message id is remembered (gateway replays come within minutes)."""
DELETED_TTL_SECONDS = 86_400
"""How long a deleted session's epoch is remembered, so a turn that began in it (and may run,
or be frozen, long after) saves nothing instead of bringing the session back."""
CLAIM_ANSWERED = "answered"
"""A claim's value once its message was answered; a lease's value is `claim_lease(token)`."""
LAST_ANSWERED_OPTION = "last_answered"
"""The scope option holding the newest claim answered there (the start-up catch-up reads it,
and `begin_turn` hands it over with the turn)."""


def answered_id(stored: str | None) -> int | None:
    """`LAST_ANSWERED_OPTION`'s value as a message id; None when unset or not an id."""
    return int(stored) if stored and stored.isdigit() else None


PERSONA_OPTION = "persona"
"""The scope option holding the place's own persona (`/persona`), which `begin_turn` reads
in the same step, so every process's next turn there uses the newest one."""
PLACES_KEPT = 1_000
"""`note_place` keeps at most this many places, the most recently noted."""
PLACES_KEPT_SECONDS = 7 * 86_400
"""...each for at most this long after it was last noted."""
PLACE_NOTE_SECONDS = 60.0
"""A process notes a place it answers in at most this often (`SessionStore.note_place`)."""
PLACE_NOTES_REMEMBERED = 10_000
"""`PlaceNotes` forgets everything past this many places (each is then noted once more)."""


class PlaceNotes:
    """Which places this process noted lately, so it notes each at most once per
    `PLACE_NOTE_SECONDS`. Bounded: past `PLACE_NOTES_REMEMBERED` places it starts afresh,
    which costs one more note each, never a missed one."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}

    def due(self, scope: str) -> bool:
        return self._due.get(scope, 0.0) <= time.monotonic()

    def noted(self, scope: str) -> None:
        if len(self._due) > PLACE_NOTES_REMEMBERED:
            self._due.clear()
        self._due[scope] = time.monotonic() + PLACE_NOTE_SECONDS

    def forget(self, scope: str) -> None:
        self._due.pop(scope, None)


def new_token() -> str:
    """What `uuid.uuid4().hex` returns (32 hex digits of a random version-4 UUID), at a third
    of the cost: every turn takes one, and this builds no `UUID` object."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # the version, 4
    raw[8] = raw[8] & 0x3F | 0x80  # the variant, RFC 4122
    return raw.hex()


def claim_lease(token: str) -> str:
    """The stored value of a claim in progress: anything else stored counts as answered."""
    return f"lease:{token}"


def claim_order(claim: str) -> tuple[int, str]:
    """Claims (Discord message ids) compare as numbers written in text."""
    return len(claim), claim


@dataclass(frozen=True)
class NotedPlace:
    """A place the bot answered in recently (`note_place`), for the start-up catch-up."""

    scope: str
    server: str | None
    """The `Account.server` it belongs to (a process running only some servers reads only
    theirs); None when unknown: noted before places recorded it, or without an account."""


@dataclass(frozen=True)
class Ticket:
    """One turn's place in its scope's queue, the same on every retry of that turn."""

    order: int
    """Turns go in increasing order (Discord message ids grow with time)."""
    token: str = field(default_factory=new_token)
    claim: str | None = None
    server: str | None = None
    """The server of the turn's place (`NotedPlace.server`), where a store notes the place
    as the turn begins."""

    @classmethod
    def now(cls, claim: str | None = None, server: str | None = None) -> Ticket:
        return cls(order=time.time_ns(), claim=claim, server=server)

    @property
    def place(self) -> str:
        """Queue entries sort as text, so the order is zero-padded (a 64-bit id fits)."""
        return f"{self.order:020d}:{self.token}"


class AlreadyClaimed(Exception):
    """Another turn has claimed this message. `answered`: for good; otherwise its turn is in
    progress elsewhere, and the message may be taken over once that lease lapses."""

    def __init__(self, *, answered: bool = True) -> None:
        super().__init__("answered" if answered else "in progress elsewhere")
        self.answered = answered


class SessionCleared(Exception):
    """The session was cleared (or replaced by an import) while the turn ran: the turn began
    before "forget everything said until now", so `finish_turn` saved none of it (and
    released the lock)."""


@dataclass(frozen=True)
class Summary:
    """What the model wrote about a session's older history, kept beside it: the messages it
    covers stay stored (the caps still apply to them), and are no longer sent."""

    text: str
    covered: int
    """How many messages it covers, counted as they were folded in (for /status)."""
    upto: int
    """The store's position of the newest message covered: the messages after it are not
    (a Redis session's `seq` numbering, a SQLite message id)."""


@dataclass(frozen=True)
class SummarySource:
    """What `begin_summary` hands the summarizer, holding the session's summarizing lease."""

    name: str
    epoch: str
    """The session's history identity: a summary of a session cleared meanwhile is not kept."""
    summary: Summary | None
    messages: list[Message]
    """The oldest messages not yet covered, oldest first."""
    positions: list[int]
    """The store's position of each of `messages` (what `Summary.upto` is set to)."""
    next_role: str | None
    """The role of the message after the last of `messages`; None when none follows."""


@dataclass(frozen=True)
class Exchange:
    """A session's last exchange, as `last_exchange` found it under a turn's lock: its newest
    user message and everything after it (the answer: assistant messages, tool calls and
    their results)."""

    messages: tuple[Message, ...]
    """The user message, then the answer."""
    stored: tuple[str, ...]
    """The same, as stored: `rewrite_last_exchange` changes the session only while its
    newest messages are still exactly these."""
    ref: str | None = None
    """The user message's ref (its Discord message id), when it has one."""
    replies: tuple[str, ...] = ()
    """The messages (Discord message ids) that carried the answer, in order."""

    @property
    def user(self) -> Message:
        return self.messages[0]

    @property
    def answer(self) -> tuple[Message, ...]:
        return self.messages[1:]

    @property
    def answered(self) -> bool:
        """Whether the question has its answer: something follows it, ending with the
        model's reply (a tail of tool calls alone is not an answer)."""
        return len(self.messages) > 1 and self.messages[-1].get("role") == "assistant"


def is_user_message(message: object) -> bool:
    return isinstance(message, dict) and message.get("role") == "user"


def answer_record(replies: Sequence[str]) -> str:
    """The one stored form of `note_answer`'s record (both backends keep it as text)."""
    return json.dumps({"replies": list(replies)}, separators=(",", ":"))


def exchange_from(
    name: str, stored: Sequence[str], ref: str | None, record: str | None
) -> Exchange:
    """An `Exchange` from its stored messages (oldest first) and its record; a record that
    cannot be read counts as none, a message as a damaged session."""
    messages = decode_messages(name, stored)
    replies: tuple[str, ...] = ()
    try:
        parsed = json.loads(record) if record else {}
    except ValueError:
        parsed = {}
    found = parsed.get("replies") if isinstance(parsed, dict) else None
    if isinstance(found, list) and all(isinstance(r, str) for r in found):
        replies = tuple(found)
    return Exchange(tuple(messages), tuple(stored), ref or None, replies)


@dataclass(frozen=True)
class Turn:
    """What `begin_turn` hands the engine: the session, its recent messages, the lock."""

    scope: str
    session: SessionInfo
    recent: list[Message]
    """Read-only: a store may share these message objects with its cache."""
    recent_bytes: int
    """The stored size of `recent`, which the store already kept within the budget."""
    lock_token: str
    as_stored: bool = False
    """Every message of `recent` is `sendable_as_stored`, so context assembly may skip
    looking at each (a store that keeps recent messages knows this without a pass)."""
    claim: str | None = None
    """The ticket's claim, held as a lease by this turn: `extend_lock` renews it and
    `finish_turn` settles it as answered."""
    epoch: str = ""
    """The session's history identity when the turn began: replaced by a clear or an import
    (not by a deletion), so `finish_turn` can tell a turn that began before a clear."""
    sequence: int = 0
    """The session's position when the turn began (it grows with every save): a turn whose
    lock lapsed saves only if the session is still exactly there."""
    persona: str | None = None
    """The scope's own persona (`PERSONA_OPTION`) when the turn began; None when it has none."""
    summary: Summary | None = None
    """The summary of the session's older messages, if any was written."""
    pending: int | None = None
    """How many of the newest stored messages the summary does not cover (None: all of
    them): only those are sent, the ones before being summarized."""
    last_answered: int | None = None
    """The newest message answered in the scope (`LAST_ANSWERED_OPTION`) when the turn
    began, read in the same step; None when none is known."""


HISTORY_CACHE_MB = 32
"""Default size of each process's cache of recent messages (Redis store), in MB stored."""
SESSIONS_PER_PLACE = 25
"""Default most sessions one place keeps (Discord's autocomplete shows at most 25)."""
MESSAGE_CAP_KB = 128
"""Default most stored KB of one message (two 50 KB text files and their text fit)."""
HISTORY_CAP_MB = 4
"""Default most stored MB of one session's history."""


@dataclass
class StoreStats:
    """Counts a store keeps for the metrics, which read them when scraped: the store needs
    nothing of Prometheus."""

    unavailable: int = 0
    """Calls that failed because storage did not answer, or not in time."""
    cache_hits: int = 0
    """Turns whose recent messages this process held (Redis), loading only what was added."""
    cache_misses: int = 0


@dataclass(frozen=True)
class StorePolicy:
    """Limits every backend applies; read from the settings by the composition root."""

    default_model: str
    ttl_seconds: int = 0
    history_cap: int = 2000
    history_cache_bytes: int = HISTORY_CACHE_MB * 1024 * 1024
    """At most this many stored bytes of recent messages are kept in memory (Redis store;
    see `bot.store.recent`); 0 turns the cache off."""
    sessions_per_place: int = SESSIONS_PER_PLACE
    """Creating or importing a session beyond this many in one scope is refused."""
    message_cap_bytes: int = MESSAGE_CAP_KB * 1024
    """A message whose stored size exceeds this is refused (the engine fits answers first)."""
    history_cap_bytes: int = HISTORY_CAP_MB * 1024 * 1024
    """Beyond this many stored bytes a session drops its oldest messages, as at the count
    cap. At least `message_cap_bytes`, so the newest message always stays."""

    @property
    def claim_seconds(self) -> int:
        """A claimed message id is remembered a day, or the TTL when that is shorter: it
        belongs to its place and goes with it."""
        return min(CLAIM_TTL_SECONDS, self.ttl_seconds) if self.ttl_seconds else CLAIM_TTL_SECONDS

    def check_sizes(
        self,
        messages: Sequence[Message],
        session: str | None = None,
        encoded: Sequence[str] | None = None,
    ) -> list[str]:
        """The stored form of `messages` (`encoded`, when the caller has it: each message's
        `encode_message`); `MessageTooLarge` when one is over the cap (naming its position
        in `session` when given, as an import does)."""
        if encoded is None:
            stored = [encode_message(m) for m in messages]
        else:
            stored = list(encoded)
            if len(stored) != len(messages):
                raise ValueError("one stored form is needed for each message")
        for i, text in enumerate(stored):
            size = stored_bytes(text)
            if size > self.message_cap_bytes:
                if session is None:
                    raise MessageTooLarge(size, self.message_cap_bytes)
                raise MessageTooLarge(
                    size,
                    self.message_cap_bytes,
                    f"Message {i} of session {session!r}",
                    "nothing was imported.",
                )
        return stored

    def stored_for_import(self, sessions: dict[str, list[Message]]) -> dict[str, list[str]]:
        """Each session's stored messages, checked, and within both caps as a turn would
        leave them (the newest that fit)."""
        kept: dict[str, list[str]] = {}
        for name, messages in sessions.items():
            stored = self.check_sizes(messages, name)[-self.history_cap :]
            sizes = [stored_bytes(text) for text in reversed(stored)]
            count, _ = newest_fitting(sizes, self.history_cap_bytes)
            kept[name] = stored[len(stored) - count :]
        return kept


def session_info(row: Sequence[Any]) -> SessionInfo:
    """Parse a backend's summary row (name, format, model, mcp JSON, created, updated, count);
    a row from another format version or with unreadable settings raises `CorruptSession`."""
    name, fmt, model, mcp, created, updated, count = row
    try:
        if fmt != STORE_FORMAT:
            raise ValueError(fmt)
        return SessionInfo(
            name=shown_name(str(name)),
            settings=_settings(str(model), mcp),
            message_count=int(count),
            created_at=float(created),
            updated_at=float(updated),
        )
    except (ValueError, TypeError):
        raise CorruptSession(shown_name(str(name))) from None


_SETTINGS_READ: dict[tuple[str, object], SessionSettings] = {}
"""Settings by their stored form: every turn reads its session's, and most sessions share a
few (settings are values, so one object serves them all)."""
_SETTINGS_READ_MAX = 1024


def _settings(model: str, mcp: object) -> SessionSettings:
    """Stored settings read (the MCP servers as JSON); `ValueError` when unreadable."""
    key = (model, mcp)
    settings = _SETTINGS_READ.get(key)
    if settings is None:
        servers = json.loads(mcp)  # type: ignore[arg-type]  # TypeError when not text
        if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
            raise ValueError(mcp)
        if len(_SETTINGS_READ) >= _SETTINGS_READ_MAX:
            _SETTINGS_READ.clear()
        settings = _SETTINGS_READ[key] = SessionSettings(model, tuple(servers))
    return settings


def listed_sessions(rows: Sequence[Sequence[Any]], default_model: str) -> list[SessionInfo]:
    """Parse `/list`'s summary rows: an unreadable one is listed by name, marked so, instead
    of failing the whole list (and `/new`, and `/load`'s choices) for the place."""
    listed = []
    for row in rows:
        try:
            listed.append(session_info(row))
        except CorruptSession:
            settings = SessionSettings(default_model)
            name = shown_name(str(row[0]))
            listed.append(SessionInfo(name, settings, 0, 0.0, 0.0, readable=False))
    return listed


_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
"""The C scanner `json.loads` ends in: called directly, it parses a stored message in half
the time (a turn decodes every message it loads, a hundred or more)."""


def _decoded(item: str) -> Any:
    """`json.loads(item)`, exactly as strict: what the scanner does not take whole (leading
    or trailing whitespace, extra data, not text) goes to `json.loads` to decide."""
    if type(item) is str:
        try:
            value, end = _SCAN(item, 0)
        except StopIteration:
            return json.loads(item)
        if end == len(item):
            return value
    return json.loads(item)


def decode_messages(name: str, stored: Sequence[str]) -> list[Message]:
    """Parse stored messages; anything that is not a message dict marks the session corrupt."""
    try:
        messages = [_decoded(item) for item in stored]
    except ValueError:
        raise CorruptSession(name) from None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise CorruptSession(name)
    return messages


def decode_message_array(name: str, stored: str) -> list[Message]:
    """Parse messages stored one per element but fetched as one JSON array."""
    try:
        messages = json.loads(stored)
    except ValueError:
        raise CorruptSession(name) from None
    if not isinstance(messages, list):
        raise CorruptSession(name)
    for message in messages:
        if type(message) is not dict or type(message.get("role")) is not str:
            raise CorruptSession(name)
    return messages


_AS_STORED_VALUES = frozenset({str, int, bool, type(None)})
"""Types of message values that decoding a message's stored form gives back unchanged."""


def as_reloaded(message: Message) -> Message | None:
    """A copy of `message` equal to what decoding its stored form gives, made without the
    decoding: for a message whose values are all text, whole numbers, booleans or null (a
    chat line, an answer). None for any other (a tool call, content parts): decode those."""
    if type(message) is not dict or type(message.get("role")) is not str:
        return None
    for key, value in message.items():
        if type(key) is not str or type(value) not in _AS_STORED_VALUES:
            return None
    return dict(message)


def mcp_json(settings: SessionSettings) -> str:
    """The stored form of the MCP servers (every saved turn sends it)."""
    if not settings.mcp_servers:
        return "[]"
    return json.dumps(list(settings.mcp_servers))


class SessionStore(Protocol):
    """Async session storage. Every method raises `StoreUnavailable` when storage is down."""

    stats: StoreStats

    async def ping(self) -> None:
        """Return once storage answers (the health check, and the start-up check);
        `StoreUnavailable` otherwise, its cause chained."""
        ...

    async def begin_turn(self, scope: str, ticket: Ticket, budget_bytes: int, lock_ms: int) -> Turn:
        """Lock the current session (creating `default` if the scope has none) and return the
        newest messages whose stored size fits `budget_bytes`. The ticket's claim is taken
        (or renewed, on a later call) as a lease of `lock_ms`. Raises `SessionBusy` while
        an earlier ticket waits or another turn holds the lock (call again with the same
        ticket), `AlreadyClaimed` when another turn holds or answered the ticket's claim, and
        `CorruptSession` when the session cannot be read (the claim then counts as answered:
        the user is told)."""
        ...

    async def claim(self, scope: str, claim: str, token: str, lease_ms: int) -> None:
        """Take, or renew, a lease on a message id before acting on it outside a turn (the
        threads mode opens a thread first); `AlreadyClaimed` when another holds or answered
        it. `settle_claim` ends the lease."""
        ...

    async def settle_claim(self, scope: str, claim: str, token: str, *, answered: bool) -> None:
        """End this token's lease: answered, the claim lasts a day (and becomes the scope's
        `LAST_ANSWERED_OPTION` when newest); not answered, it is handed back for another
        process to take. Nothing happens when the lease is no longer this token's."""
        ...

    async def note_place(self, scope: str, server: str | None = None) -> None:
        """Remember that the bot answers in `scope`, which belongs to `server` (a bounded
        record, expiring by itself)."""
        ...

    async def recent_places(self) -> list[NotedPlace]:
        """The places noted by `note_place` and not expired, most recent first, each with
        the server last noted with it."""
        ...

    async def finish_turn(
        self,
        turn: Turn,
        added: Sequence[Message],
        user_ref: str | None = None,
        usage: Charge | None = None,
        encoded: Sequence[str] | None = None,
    ) -> bool:
        """Append `added` and release the lock in one step, dropping the oldest messages
        beyond the policy's caps. `user_ref` (for example a Discord message id) names the
        first added message so `forget_message` can remove it. Returns False, saving nothing,
        when the lock was lost to another turn, or lapsed while the session changed (cleared,
        replaced, or another turn saved): stale work is never saved. Raises `SessionCleared`,
        saving nothing, when the turn still held its lock but the session was cleared or
        replaced meanwhile. The turn's claim, while still its lease, is settled as answered
        in the same step (a turn that failed or lost its lock told the user so). Raises
        `MessageTooLarge`, saving nothing and keeping the lock (the caller releases it), when
        a message is over the cap. `usage`, the turn's model run, is added to its session's
        totals in the same step, whatever the outcome, once even when a call whose reply was
        lost is repeated (the server's counters are the caller's: `record_usage(session=False)`).
        `encoded`: `added` as stored, each its `encode_message`, when the caller has them
        (the engine measured each message): not encoded again."""
        ...

    async def extend_lock(self, turn: Turn, lock_ms: int) -> bool:
        """Keep a long turn's lock, and its claim's lease, alive; False when it was lost."""
        ...

    async def current_session(self, scope: str) -> SessionInfo:
        """The scope's current session; an untouched scope reports an empty `default`."""
        ...

    async def list_sessions(self, scope: str) -> list[SessionInfo]:
        """The scope's sessions, most recently used first; at most `sessions_per_place`."""
        ...

    async def create_session(self, scope: str, name: str, settings: SessionSettings) -> SessionInfo:
        """Create an empty session and make it current; `InvalidInput` if the name is taken,
        `SessionLimit` if the scope has `sessions_per_place` sessions already."""
        ...

    async def switch_session(self, scope: str, name: str) -> SessionInfo:
        """Make an existing session current; `UnknownSession` if there is none by that name."""
        ...

    async def clear_session(self, scope: str) -> SessionInfo:
        """Empty the current session's history, keeping its settings."""
        ...

    async def update_settings(self, scope: str, settings: SessionSettings) -> SessionInfo:
        """Replace the current session's model and MCP servers."""
        ...

    async def forget_message(self, scope: str, user_ref: str) -> bool:
        """Remove the stored user message named by `user_ref`; False if none is stored.
        Damaged data in the way raises `DamagedState` (the place's) or `CorruptSession`,
        having changed nothing, so the deletion is reported rather than skipped silently."""
        ...

    async def delete_session(self, scope: str, name: str) -> str | None:
        """Delete the session `name` and everything stored with it (its messages, their
        delete references, its settings). When it was the current one, a fresh empty session
        (`default`, or `chat-N` when that name is taken) becomes current, and its name is
        returned; otherwise None. `UnknownSession` when there is none by that name. A turn
        that began in the deleted session saves nothing (`finish_turn` raises
        `SessionCleared`), even when a fresh session of the same name exists by then."""
        ...

    async def forget_place(self, scope: str) -> int:
        """Delete everything the scope keeps: every session (as `delete_session`), its
        current session, its options (`/mode`, the last message answered) and its entry in
        the record of places answered. Returns how many sessions went. What lapses by itself
        is left: message claims (ids only), the queue, deleted-message markers, locks of
        turns in progress (which save nothing)."""
        ...

    async def scope_option(self, scope: str, option: str) -> str | None:
        """A per-scope option (such as when the bot answers), or None when never set."""
        ...

    async def set_scope_option(self, scope: str, option: str, value: str | None) -> None:
        """Set a per-scope option; None removes it (it reads as never set again)."""
        ...

    async def swap_scope_option(self, scope: str, option: str, expected: str, value: str) -> bool:
        """Set the option to `value` only while it holds `expected`, atomically across
        processes; whether it did. So one caller among many (processes, retries) acts once."""
        ...

    async def read_history(self, scope: str, name: str) -> list[Message]:
        """A session's whole stored history, oldest first (for export)."""
        ...

    async def note_answer(self, scope: str, ref: str, replies: Sequence[str]) -> None:
        """Record which messages (ids) carried the answer to the stored user message `ref`,
        replacing an earlier record; /retry edits them. Nothing happens when `ref` is not
        stored (any more). The record goes with its message: trimmed, forgotten, cleared,
        undone or expired."""
        ...

    async def last_exchange(self, turn: Turn) -> Exchange | None:
        """The last exchange of the session `turn` holds the lock of: its newest user message
        and all after it, with that message's ref and record. None when the session holds no
        user message. Raises `CorruptSession` when a message there cannot be read."""
        ...

    async def rewrite_last_exchange(
        self, turn: Turn, exchange: Exchange, answer: Sequence[Message] | None
    ) -> bool:
        """Replace `exchange`'s answer with `answer` (the user message, its ref and record
        staying), or with None remove the whole exchange (ref and record too), and release
        the lock, in one step. Fenced as `finish_turn` is, and done only while the session's
        newest messages are still exactly `exchange` (a deletion meanwhile may have changed
        them): otherwise False, changing nothing (the lock is released when it was still
        this turn's). Raises `SessionCleared` as `finish_turn` does. Repeating a call that
        succeeded returns True and changes nothing more. Afterwards, a turn that lost its
        lock before it saves nothing, as after another turn."""
        ...

    async def import_sessions(
        self, scope: str, sessions: dict[str, list[Message]], settings: SessionSettings
    ) -> dict[str, int]:
        """Store whole sessions at once, replacing same-named ones, each cut to the caps: all
        or nothing (`SessionLimit`, `MessageTooLarge` naming the message). Returns how many
        messages of each session were stored (fewer than given when cut to the caps)."""
        ...

    async def read_summary(self, scope: str, name: str) -> Summary | None:
        """The session's summary; None when none was written since it was created or cleared."""
        ...

    async def begin_summary(
        self, scope: str, name: str, token: str, lease_ms: int, keep: int, limit: int
    ) -> SummarySource | None:
        """Take the session's summarizing lease (so no two processes summarize it at once)
        and return its summary and the oldest messages the summary does not cover: at most
        `limit`, leaving out the newest `keep`. None, taking nothing, when the session does
        not exist or there is nothing to add; `SummaryInProgress` while another token holds
        the lease."""
        ...

    async def save_summary(
        self, scope: str, token: str, source: SummarySource, summary: Summary
    ) -> bool:
        """Store `summary` in place of the session's, and release the lease, if this token
        still holds it, the session was not cleared or replaced, and its summary is still the
        one `source` held; otherwise store nothing (False). Messages are never removed."""
        ...

    async def release_summary(self, scope: str, name: str, token: str) -> None:
        """Give the summarizing lease back (when this token holds it), storing nothing."""

    async def admit(self, admission: Admission) -> Refusal | None:
        """Check a message against its account's limits and, when it passes, count it in
        the member's message rate, in one atomic step (a message counts once, however often
        it is checked). A refusal's `notify` is True for at most one refusal a minute per
        member: the one to answer."""
        ...

    async def record_usage(self, charge: Charge, *, session: bool = True) -> None:
        """Add a run's tokens to its server's day and (unless `session` is False, when a
        turn's save adds them) to its session's totals."""
        ...

    async def session_usage(self, scope: str, name: str, server: str, day: str) -> SessionUsage:
        """A session's token totals, and its and its server's tokens on `day`."""
        ...

    async def server_usage(self, server: str, days: list[str]) -> ServerUsage:
        """A server's tokens on `days[0]` and over all `days`, and its top users over them."""
        ...

    async def close(self) -> None: ...
