"""Token usage and usage limits, kept in the store so every process sees the same counts.

Who pays for a turn is an `Account`: a user in a *server* (a Discord guild; a DM counts as a
server of its own, one per user). Every model call's tokens are added to its session's
totals and to the server's counters for the day (UTC); the limits (a member's messages per
minute, a member's and a server's tokens per day) are checked against those counters before
a message goes to the model. Nothing here knows Discord: the glue names servers and users.

Token counts come from the API's `usage` where the answer carries it; when a call's answer
does not, the turn's count is estimated from the text (about four characters a token) and
marked as an estimate wherever it is shown.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

from bot.errors import BotError

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
class UsageMeter:
    """Filled in by the model client during one run: the tokens each call's answer reported,
    and what an estimate needs in case one did not report them."""

    calls: int = 0
    """Answers received (an answer refused with an error is not a call that cost tokens)."""
    reported: int = 0
    """Of those, the answers that carried `usage`."""
    input_tokens: int = 0
    output_tokens: int = 0
    sent_chars: int = 0
    answer_chars: int = 0

    def add_reported(self, input_tokens: int, output_tokens: int) -> None:
        self.reported += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def usage(self) -> Usage:
        """The run's usage: as reported when every answer carried it, else estimated."""
        if self.calls and self.reported >= self.calls:
            return Usage(self.input_tokens, self.output_tokens)
        return Usage(
            estimate_tokens(self.sent_chars), estimate_tokens(self.answer_chars), estimated=True
        )


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Charge:
    """One model run's usage, charged to its session and its account's server for `day`."""

    account: Account
    scope: str
    session: str
    usage: Usage
    day: str


@dataclass(frozen=True)
class UsageLimits:
    """Each 0 = off (the default)."""

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

    def __init__(self, refusal: Refusal, limits: UsageLimits, now: float) -> None:
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
        super().__init__(f"{what}; {when}. This message was not sent to the model.")
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
