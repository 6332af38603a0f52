"""Token usage and usage limits, kept in the store so every process sees the same counts.

Who pays for a turn is an `Account`: a user in a *server* (a Discord guild; a DM counts as a
server of its own, one per user). Every model call's tokens are added to its session's
totals and to the server's counters for the day (UTC), through the `UsageLedger`: a turn's
calls, `/retry`'s, summaries' and thread titles' alike. The limits (a member's messages per
minute, a member's and a server's tokens per day) are checked against those counters when a
message is admitted, before it goes to the model. Nothing here knows Discord: the glue names
servers and users.

Token counts come from the API's `usage` where the answer carries it; when a call's answer
does not (a provider that does not report it, an answer that broke off), its count is
estimated from the text sent and received (about four characters a token) and marked as an
estimate wherever it is shown. A call refused with an error status cost nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from bot.errors import BotError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
"""How estimates turn text into tokens (the budget of the context counts the same way)."""
USAGE_DAYS_KEPT = 40
"""Daily counters are kept this many days (`/usage` shows 30), then expire."""
USAGE_REPORT_DAYS = 30
TOP_USERS_SHOWN = 5
RATE_WINDOW_SECONDS = 60
"""The message rate counts the messages of the last minute (a sliding window)."""
NOTICE_SECONDS = 60
"""A member over a limit is told so at most once in this long (the other messages are
ignored silently), across processes."""


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def day_of(now: float) -> str:
    """The UTC day that counters are kept by, as `YYYY-MM-DD`."""
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")


def days_back(now: float, count: int) -> list[str]:
    """The last `count` days, today first."""
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    return [(today - datetime.timedelta(days=i)).isoformat() for i in range(count)]


def next_day_at(now: float) -> float:
    """When the day of `now` ends (UTC midnight): daily budgets start again then."""
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    midnight = datetime.datetime.combine(today, datetime.time(), datetime.UTC)
    return (midnight + datetime.timedelta(days=1)).timestamp()


def direct_server(user: str) -> str:
    """The server a direct conversation (a DM) counts as: one per user."""
    return f"dm:{user}"


@dataclass(frozen=True)
class Account:
    """Who a turn is charged to. `server` and `user` are opaque ids chosen by the caller."""

    server: str
    user: str
    admin: bool = False
    """Admins are exempt from limits unless `UsageLimits.apply_to_admins`."""


@dataclass
class CallUsage:
    """One model call the API accepted (it answered with status 200): what it reported, or
    what an estimate needs, counted as its request is sent and its answer arrives, so a call
    whose answer broke off midway still counts what passed."""

    sent_chars: int
    answer_chars: int = 0
    reported: tuple[int, int] | None = None
    """Input and output tokens, when the answer carried `usage`."""


@dataclass
class UsageMeter:
    """Filled in by the model client during one run, call by call (tool rounds make several).

    A call refused outright with an error status spent nothing and is not in `calls`; one the
    API accepted is, whether its answer then arrived whole, broke off, or the run failed
    later: its tokens were spent, so the run is charged for them whatever the outcome."""

    calls: list[CallUsage] = field(default_factory=list)

    def call(self, sent_chars: int) -> CallUsage:
        """Note a call the API accepted, `sent_chars` long."""
        call = CallUsage(sent_chars)
        self.calls.append(call)
        return call

    def usage(self) -> Usage | None:
        """The run's usage: the reported tokens of the calls that reported them, an estimate
        from the text for the others (then the whole is marked estimated). None when no call
        was accepted: nothing was spent."""
        if not self.calls:
            return None
        tokens_in = tokens_out = sent = received = 0
        estimated = False
        for call in self.calls:
            if call.reported is None:
                estimated = True
                sent += call.sent_chars
                received += call.answer_chars
            else:
                tokens_in += call.reported[0]
                tokens_out += call.reported[1]
        tokens_in += estimate_tokens(sent)
        tokens_out += estimate_tokens(received)
        return Usage(tokens_in, tokens_out, estimated)


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def estimated_tokens(self) -> int:
        """How many of the tokens are estimates: the stores keep this count beside the
        totals, so a sum of reported and estimated runs can be marked as holding estimates."""
        return self.total if self.estimated else 0


NOTHING_USED = Usage(0, 0)


@dataclass(frozen=True)
class Charge:
    """One model run's usage, charged to its session and its account's server for `day`."""

    account: Account
    scope: str
    session: str
    usage: Usage
    day: str


class UsageRecorder(Protocol):
    """The part of the session store that keeps the counts (`SessionStore.record_usage`)."""

    async def record_usage(self, charge: Charge, *, session: bool = True) -> None: ...


class UsageLedger:
    """Charges every model run to its session and its account: a turn, `/retry`, a summary
    and a thread title alike, so the totals hold every call. Charging never refuses a run
    (the limits are checked when a message is admitted, before its cost is known), and a
    storage fault loses the count, never the run's result."""

    def __init__(self, store: UsageRecorder, clock: Callable[[], float] = time.time) -> None:
        """`clock` (unix seconds) dates the charge."""
        self._store = store
        self._clock = clock

    async def charge(
        self, meter: UsageMeter, account: Account | None, scope: str, session: str
    ) -> Usage | None:
        """Record what `meter` saw for `account`, in session `session` of `scope`; without an
        account (the console) it is only returned. None when no call cost anything."""
        usage = meter.usage()
        if usage is None or account is None:
            return usage
        charge = Charge(account, scope, session, usage, day_of(self._clock()))
        try:
            await self._store.record_usage(charge)
        except BotError as error:
            log.warning("could not count a model run's tokens: %s", error)
        return usage

    def charge_of(
        self, meter: UsageMeter, account: Account | None, scope: str, session: str
    ) -> Charge | None:
        """What `charge` would record, for a turn whose save adds the session's share (in
        the same step as the save: one round trip less); None when nothing is charged."""
        usage = meter.usage()
        if usage is None or account is None:
            return None
        return Charge(account, scope, session, usage, day_of(self._clock()))

    async def charge_server(self, charge: Charge | None) -> None:
        """The server's share of `charge` (its counters are elsewhere in the store than the
        session's), run beside the save that adds the session's share."""
        if charge is None:
            return
        try:
            await self._store.record_usage(charge, session=False)
        except BotError as error:
            log.warning("could not count a model run's tokens: %s", error)

    @contextlib.asynccontextmanager
    async def metered(
        self, account: Account | None, scope: str, session: str
    ) -> AsyncIterator[UsageMeter]:
        """A meter for the model run inside, charged when the run ends, succeeded or not:
        the tokens of the calls the API accepted were spent either way."""
        meter = UsageMeter()
        try:
            yield meter
        finally:
            await self.charge(meter, account, scope, session)


@dataclass(frozen=True)
class UsageLimits:
    """Each 0 = off (the default).

    The token budgets are checked when a message is admitted, because its cost is known
    only once it is answered: a message admitted under both budgets is answered in full and
    charged all its tokens, even those that take the day's count past a budget; the next
    message is refused. A message is checked against what was charged so far, so messages
    admitted while others are still being answered may each be answered too: a budget is
    overshot by at most those turns. `/retry` is checked like a message; background work
    (summaries, thread titles) is never checked, only charged."""

    messages_per_minute: int = 0
    user_tokens_per_day: int = 0
    server_tokens_per_day: int = 0
    apply_to_admins: bool = False

    def apply_to(self, account: Account) -> bool:
        on = self.messages_per_minute or self.user_tokens_per_day or self.server_tokens_per_day
        return bool(on) and (self.apply_to_admins or not account.admin)


@dataclass(frozen=True)
class Admission:
    """One message asking to go to the model; the store checks and charges it atomically."""

    account: Account
    message: str
    """The message's id: charged once to the message rate however often it is checked."""
    now: float
    limits: UsageLimits

    @property
    def day(self) -> str:
        return day_of(self.now)


RATE = "rate"
USER_BUDGET = "user"
SERVER_BUDGET = "server"


@dataclass(frozen=True)
class Refusal:
    """Why a message was refused (`RATE`, `USER_BUDGET` or `SERVER_BUDGET`), when the member
    may continue (unix seconds), and whether this refusal is the one to tell them about."""

    limit: str
    until: float
    notify: bool


class OverLimit(BotError):
    """A member over a limit: the message is not stored and not sent to the model. Show the
    text only when `notify` (at most once a minute per member, across processes)."""

    def __init__(
        self, refusal: Refusal, limits: UsageLimits, now: float, subject: str = "This message"
    ) -> None:
        wait = _duration(refusal.until - now)
        at = datetime.datetime.fromtimestamp(refusal.until, datetime.UTC).strftime("%H:%M")
        if refusal.limit == RATE:
            what = f"You can send {limits.messages_per_minute} messages a minute to the bot"
            when = f"you can continue in {wait}"
        elif refusal.limit == USER_BUDGET:
            what = f"You have used your {limits.user_tokens_per_day:,} tokens for today"
            when = f"you can continue at {at} UTC (in {wait})"
        else:
            what = f"This server has used its {limits.server_tokens_per_day:,} tokens for today"
            when = f"the bot answers again at {at} UTC (in {wait})"
        super().__init__(f"{what}; {when}. {subject} was not sent to the model.")
        self.refusal = refusal
        self.notify = refusal.notify


def _duration(seconds: float) -> str:
    whole = max(1, math.ceil(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes = math.ceil(whole / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


@dataclass(frozen=True)
class SessionUsage:
    """A session's tokens since it began, and its and its server's tokens today."""

    input_tokens: int = 0
    output_tokens: int = 0
    estimated_tokens: int = 0
    """Of the total, how many were estimated (the model service did not report them)."""
    today: int = 0
    server_today: int = 0


@dataclass(frozen=True)
class Totals:
    input_tokens: int = 0
    output_tokens: int = 0
    estimated_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class ServerUsage:
    today: Totals = Totals()
    period: Totals = Totals()
    top_users: list[tuple[str, int]] = field(default_factory=list)
    """The users with the most tokens over the period, most first."""


def _marked(tokens: int, estimated: int) -> str:
    """`~` before a count that holds estimates, so nobody reads it as exact."""
    return f"{'~' if estimated else ''}{tokens:,}"


def describe_session_usage(usage: SessionUsage, server: str) -> list[str]:
    """The `/status` lines about tokens."""
    estimated = usage.estimated_tokens
    total = usage.input_tokens + usage.output_tokens
    lines = [
        f"Tokens: {_marked(usage.input_tokens, estimated)} in, "
        f"{_marked(usage.output_tokens, estimated)} out"
        + (f" (~{estimated:,} of {total:,} estimated from text)" if estimated else "")
    ]
    where = "your DMs'" if server.startswith(direct_server("")) else "this server's"
    share = f"{100 * usage.today / usage.server_today:.0f}%" if usage.server_today else "0%"
    lines.append(f"Today: {usage.today:,} tokens, {share} of {where} {usage.server_today:,}")
    return lines


def describe_server_usage(usage: ServerUsage, mention: str) -> str:
    """`/usage`: today, the report period and its top users (`mention` formats a user id)."""

    def line(label: str, totals: Totals) -> str:
        est = totals.estimated_tokens
        text = (
            f"{label}: {_marked(totals.total, est)} tokens "
            f"({_marked(totals.input_tokens, est)} in, {_marked(totals.output_tokens, est)} out)"
        )
        return text + (f"; ~{est:,} estimated from text" if est else "")

    lines = [
        "Token use here (UTC days):",
        line("Today", usage.today),
        line(f"Last {USAGE_REPORT_DAYS} days", usage.period),
    ]
    if usage.top_users:
        lines.append(f"Top users, last {USAGE_REPORT_DAYS} days:")
        lines += [
            f"{i}. {mention.format(user)}: {tokens:,} tokens"
            for i, (user, tokens) in enumerate(usage.top_users, 1)
        ]
    if usage.period.estimated_tokens:
        lines.append("~ marks counts that include estimates (about 4 characters a token).")
    return "\n".join(lines)
