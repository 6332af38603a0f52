"""One conversation turn: lock and load the session, run the model, save the turn.

The turn is saved only when the model answered: a failed call stores nothing (not even the
user's message), so history never holds a question without its answer or a dangling tool
call, and the user is told to send it again. Turns in one session are serialized: in this
process by a lock per scope (which keeps arrival order), across processes by the store's lock.

A turn holds its message's claim as a lease, renewed with the lock: when another process has
the message in progress, this one keeps it and asks again at the lease's pace, until it was
answered (then it gives up) or the lease lapsed (its holder died: then it answers). A turn
cancelled by a shutdown hands its claim back, so another process or the next start answers.
A turn that learns another process took its message over (it was frozen past its lease)
stops its model run and raises `AnsweredElsewhere`: the user sees the other process's answer
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from bot.context import (
    CHANNEL_CONTEXT_SHARE,
    ChannelContext,
    Context,
    build_context,
    channel_context_message,
    fitted_and_stored,
    history_room,
    paired_tool_messages,
    speaker_of,
    system_prompt,
)
from bot.errors import (
    BotError,
    ExchangeChanged,
    MessageTooLarge,
    ModelError,
    NothingToRewrite,
    NotYourExchange,
    SessionBusy,
    StoreUnavailable,
    SummaryInProgress,
)
from bot.logs import about_turn, note_session
from bot.metrics import Metrics, TurnOutcome, TurnPart
from bot.model import ContextTooLong, ModelChoice, ModelClient, TextSink
from bot.store.base import (
    LAST_ANSWERED_OPTION,
    MESSAGE_CAP_KB,
    PERSONA_OPTION,
    AlreadyClaimed,
    Exchange,
    Message,
    PlaceNotes,
    SessionCleared,
    SessionSettings,
    SessionStore,
    Ticket,
    Turn,
    answered_id,
    encode_message,
    message_size,
    new_token,
    stored_bytes,
)
from bot.summary import Summarizer
from bot.usage import (
    Account,
    Admission,
    Charge,
    OverLimit,
    Usage,
    UsageLedger,
    UsageLimits,
    UsageMeter,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ChannelContextSource = Callable[[str, int | None], Awaitable[ChannelContext | None]]
"""Collects what was said around the message (see `ChannelContext`); called only by the
process that answers, once it holds the turn, so the place is read once per message. It is
given the turn's scope and the newest message answered there when the turn began
(`Turn.last_answered`, read with the turn: no store call of its own)."""


BUSY_POLL_MAX_SECONDS = 0.1
"""A waiting turn asks again at least this often, so a queue of turns moves briskly."""
SAVE_RETRY_PAUSES = (0.2, 0.5, 1.0)
"""Pauses between tries to save a turn whose answer is already in hand."""
NOT_KEPT_NOTE = (
    "The conversation was cleared or deleted while this answer was written; this exchange was "
    "not kept."
)
"""Shown under an answer whose `Reply.kept` is False."""
WITHOUT_HISTORY_NOTE = (
    "The model saw this message without the earlier conversation: they did not fit the "
    "context budget together (CONTEXT_BUDGET_TOKENS)."
)
"""Shown under an answer whose `Reply.without_history` is True."""
HAND_BACK_SECONDS = 5.0
"""At shutdown, how long turns cut short get to hand back their claims and locks."""
SUMMARY_RETRY_SECONDS = 60.0
"""After a failed summary call, a session's older messages are cut as before for this long
before the next try, so a model outage does not double the calls of every turn."""
SUMMARY_START_SHARE = 0.75
"""A summary is brought up to date once the history sent takes this share of the room the
budget leaves it (or some of it had to be left out): it then keeps half of that room."""


@dataclass(frozen=True)
class EngineLimits:
    system_prompt: str
    """The default system prompt, for places without a persona."""
    budget_bytes: int
    lock_ms: int = 15_000
    """A crashed process blocks its session, and the message it was answering, at most this
    long (the lease); live turns renew it."""
    wait_seconds: float = 300.0
    """How long a turn waits for the session while other turns run before giving up."""
    message_cap_bytes: int = MESSAGE_CAP_KB * 1024
    """A user message over this stored size is refused before the model sees it; a longer
    answer or tool result is stored cut, with a note (the user saw it whole)."""
    channel_context_share: float = CHANNEL_CONTEXT_SHARE
    """At most this share of `budget_bytes` goes to the channel's messages around a mention."""
    summaries: bool = True
    """Whether the older history is summarized (see `bot.summary`) rather than only cut."""
    summary_lease_ms: int = 300_000
    """A process that dies while summarizing keeps others from summarizing that session
    at most this long; it should outlast a model call with its retries."""
    models: ModelChoice | None = None
    """A session whose model is not allowed (any more) is answered by the default; None
    sends each session's model as stored."""
    usage: UsageLimits = field(default_factory=UsageLimits)
    """Messages per minute and tokens per day (all off by default), checked before a turn."""

    persona_note: str = ""
    """Sent after a place's persona, which replaces `system_prompt` (see
    `bot.context.system_prompt`)."""

    @property
    def channel_context_bytes(self) -> int:
        return int(self.budget_bytes * self.channel_context_share)

    @property
    def claim_poll_seconds(self) -> float:
        """How often a message in progress in another process is looked at again."""
        return self.lock_ms / 5000


@dataclass(frozen=True)
class Backfill:
    """What a start answers of what was said while no process ran (see `catch_up_from`)."""

    max_age_seconds: int = 0
    """Messages older than this are left alone; 0 answers nothing missed."""
    max_messages: int = 20
    """At most this many messages are read per place: the newest, answered oldest first."""


@dataclass(frozen=True)
class Reply:
    text: str
    session: str
    shortened: bool
    """The provider refused the full context, and the answer came from a shorter history."""
    kept: bool = True
    """False when the session was cleared while the model answered: /clear means "forget
    everything said until now", so this exchange, begun before it, was not saved."""
    without_history: bool = False
    """The session had earlier messages but none fitted the budget beside the new message
    (a long message, or a long last answer): the model answered it alone."""
    usage: Usage | None = None
    """The tokens the model run took (reported by the API, or estimated)."""


class EmptyAnswer(ModelError):
    def __init__(self) -> None:
        super().__init__(
            "The model sent back an empty answer. Send your message again.", "empty_answer"
        )


class LostTurn(BotError):
    def __init__(self) -> None:
        super().__init__("This conversation moved on while you waited; send your message again.")


class ShuttingDown(Exception):
    """The process is stopping: it takes no new turn (another process, or the next start,
    answers the message)."""


class Stopping(BotError):
    def __init__(self) -> None:
        super().__init__("The bot is restarting; nothing was changed. Try again in a moment.")


Rewrite = Literal["retry", "undo"]


@dataclass(frozen=True)
class Retried:
    text: str
    exchange: Exchange
    """The exchange as it was before: its question, who asked, where the old answer went."""
    shortened: bool


class AnsweredElsewhere(AlreadyClaimed):
    """This turn's lease lapsed (its process was frozen) and another process took its message
    over: that process answers it, so this turn stopped, saved nothing, and what it already
    showed of its answer is to be removed (not followed by "send your message again")."""

    def __init__(self) -> None:
        super().__init__(answered=True)


@dataclass
class _Held:
    at: float
    """When the turn's lock and lease were last known held (`time.monotonic()`)."""


class _Working:
    """`Engine._working_on`: a plain class, as it wraps every turn (a generator-based context
    manager costs more)."""

    __slots__ = ("_engine", "_outer", "_task")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __enter__(self) -> Callable[[], None]:
        engine = self._engine
        if engine._draining:
            raise ShuttingDown()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._outer = outer = engine._working.get(task)
        if outer is None:  # tracked until it ends: the answer is posted after the turn
            task.add_done_callback(engine._done_working)
        engine._working[task] = False
        return self._holding

    def _holding(self) -> None:
        self._engine._working[self._task] = True

    def __exit__(self, *_: object) -> None:
        outer = self._outer
        self._engine._working[self._task] = True if outer is None else outer


class _ScopeQueue:
    """A scope's lock, and how many of this process's turns wait for or hold it: the entry
    goes when the last one leaves."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _ScopeTurn:
    """`Engine._scope_turn`: tracked (`_Working`), then the scope's lock."""

    __slots__ = ("_queue", "_queues", "_scope", "_working")

    def __init__(self, working: _Working, queues: dict[str, _ScopeQueue], scope: str) -> None:
        self._working, self._queues, self._scope = working, queues, scope

    async def __aenter__(self) -> Callable[[], None]:
        holding = self._working.__enter__()
        queue = self._queues.get(self._scope)
        if queue is None:
            queue = self._queues[self._scope] = _ScopeQueue()
        queue.users += 1
        self._queue = queue
        try:
            await queue.lock.acquire()
        except BaseException:
            self._leave()
            raise
        return holding

    async def __aexit__(self, *_: object) -> None:
        self._queue.lock.release()
        self._leave()

    def _leave(self) -> None:
        queue = self._queue
        queue.users -= 1
        if not queue.users:
            del self._queues[self._scope]
        self._working.__exit__()


P = ParamSpec("P")
TurnMethod = Callable[Concatenate["Engine", str, Message, P], Coroutine[Any, Any, Reply]]


def _about_the_turn(method: TurnMethod[P]) -> TurnMethod[P]:
    """Every line logged during the turn names its scope and message (see `bot.logs`), and
    the turn is counted by its outcome (see `bot.metrics`)."""

    @functools.wraps(method)
    async def observed(
        self: Engine, scope: str, user: Message, /, *a: P.args, **k: P.kwargs
    ) -> Reply:
        message = k.get("claim") or k.get("user_ref")
        started = time.perf_counter()
        outcome = TurnOutcome.FAILED
        try:
            with about_turn(scope, None if message is None else str(message)):
                reply = await method(self, scope, user, *a, **k)
            outcome = TurnOutcome.ANSWERED if reply.kept else TurnOutcome.NOT_KEPT
            self.metrics.place_answered(scope)
            return reply
        except (AlreadyClaimed, ShuttingDown):
            outcome = TurnOutcome.ELSEWHERE
            raise
        except (MessageTooLarge, SessionBusy):
            outcome = TurnOutcome.REFUSED
            raise
        except ModelError as error:
            outcome = TurnOutcome.MODEL_ERROR
            self.metrics.model_errors.labels(error.kind).inc()
            raise
        except StoreUnavailable:
            outcome = TurnOutcome.STORE_UNAVAILABLE
            raise
        except asyncio.CancelledError:
            outcome = TurnOutcome.HANDED_BACK
            raise
        finally:
            self.metrics.turn_ended(outcome, time.perf_counter() - started)

    return observed


class Engine:
    def __init__(
        self,
        store: SessionStore,
        model: ModelClient,
        limits: EngineLimits,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` (unix seconds) dates usage and measures the limits' windows."""
        self.metrics = metrics or Metrics()
        """Counted here, whoever serves them (`bot.health`); a bot without the listener
        counts into a registry nobody reads."""
        self._store = store
        self._model = model
        self._limits = limits
        self._clock = clock
        self._scope_queues: dict[str, _ScopeQueue] = {}
        self._working: dict[asyncio.Task[Any], bool] = {}
        """The tasks with a turn (or a claim) under way, True once it holds its message."""
        self._draining = False
        self._places_noted = PlaceNotes()
        self.ledger = UsageLedger(store, clock)
        """Where every model run's tokens are charged (turns, retries, summaries)."""
        self.summaries = Summarizer(
            store, model, limits.budget_bytes, limits.summary_lease_ms, self.ledger
        )
        self._summarizing: dict[str, asyncio.Task[None]] = {}
        """The summaries being written in the background, by scope (one at a time each)."""
        self._summary_paused: dict[str, float] = {}
        self._retired_logged: set[str] = set()

    @property
    def channel_context_bytes(self) -> int:
        """The most a turn's channel context may take (a collector can stop reading there)."""
        return self._limits.channel_context_bytes

    @property
    def draining(self) -> bool:
        """The process is stopping (`drain`): take no new work."""
        return self._draining

    def _scope_turn(self, scope: str) -> _ScopeTurn:
        """This process's turns of a scope one at a time, in arrival order, each tracked."""
        return _ScopeTurn(self._working_on(), self._scope_queues, scope)

    def _working_on(self) -> _Working:
        """Track the current task while it waits for (and then holds, once it calls the
        function it is handed) a message, and after, until it ends (it posts the answer),
        so `drain` can find it."""
        return _Working(self)

    def _done_working(self, task: asyncio.Task[Any]) -> None:
        self._working.pop(task, None)

    async def background_done(self) -> None:
        """Wait until no summary is being written in the background (so a benchmark, or a
        script, sees its effect on the next turn every time)."""
        while self._summarizing:
            await asyncio.wait(list(self._summarizing.values()))

    async def cancel_background(self) -> None:
        """Stop the summaries being written in the background (each hands its lease back, so
        another process writes it): what a program does before closing the store."""
        self._draining = True  # and start no other
        tasks = list(self._summarizing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=HAND_BACK_SECONDS)

    async def drain(self, grace: float) -> None:
        """Stop taking turns; let turns holding their message finish within `grace` seconds;
        cancel the others (waiting ones at once), which hands their claims and locks back so
        another process, or the next start, answers those messages."""
        self._draining = True
        cut: set[asyncio.Task[Any]] = set()

        def cut_short(tasks: list[asyncio.Task[Any]]) -> None:
            for task in tasks:
                if task not in cut and not task.done():
                    task.cancel()
                    cut.add(task)

        cut_short([task for task, holding in self._working.items() if not holding])
        running = [task for task, holding in self._working.items() if holding]
        running += self._summarizing.values()
        if running:
            log.info("finishing %d turn(s) in flight, for at most %s s", len(running), grace)
            await asyncio.wait(running, timeout=grace)
        cut_short([*running, *self._working, *self._summarizing.values()])
        if cut:
            log.info("handing back %d message(s) not answered", len(cut))
            await asyncio.wait(cut, timeout=HAND_BACK_SECONDS)

    @_about_the_turn
    async def reply(
        self,
        scope: str,
        user: Message,
        *,
        user_ref: str | None = None,
        order: int | None = None,
        claim: str | None = None,
        on_text: TextSink | None = None,
        on_begin: Callable[[], Awaitable[None]] | None = None,
        parent: str | None = None,
        account: Account | None = None,
        limits_checked: bool = False,
        around: ChannelContextSource | None = None,
    ) -> Reply:
        """Answer `user` in the scope's current session. With `on_text`, the answer streams:
        each text delta is handed to it as it arrives, and the full text is saved at the end.
        `on_begin` runs once the turn holds the session, before the model: only the process
        that answers gets there (a typing indicator starts there, not in every process).
        `user_ref` names the stored user message so it can be forgotten later. Turns of a
        scope go in increasing `order` (default: now) across processes; a `claim` (a message
        id) is answered once, later tries raising `AlreadyClaimed`. The scope's persona, else
        `parent`'s (a thread's channel), replaces the default system prompt; both are read
        at the turn's start, so a change made by any process counts from the next turn.
        `around` adds what was said around the message to this call only
        (`channel_context_message`): it is never stored, and its size comes out of the
        history's room."""
        cap = self._limits.message_cap_bytes
        user_stored = encode_message(user)
        size = stored_bytes(user_stored)
        if size > cap:
            if claim is not None:  # refused once, by whichever process takes it
                token = new_token()
                await self._until_claimed(
                    lambda: self._store.claim(scope, claim, token, self._limits.lock_ms)
                )
                await self._settle(scope, claim, token, answered=True)
            raise MessageTooLarge(size, cap)
        server = account.server if account is not None else None
        ticket = (
            Ticket(order=order, claim=claim, server=server)
            if order is not None
            else Ticket.now(claim, server)
        )
        meter = UsageMeter()
        async with self._scope_turn(scope) as holding:
            if account is not None and not limits_checked:
                await self._admit(scope, ticket.claim, ticket.token, account)
            # The history loaded: what fits beside the default prompt. The place's persona
            # comes with the turn, and the context is then cut to the room beside it.
            room = history_room(
                self._limits.system_prompt, user, self._limits.budget_bytes, user_bytes=size
            )
            try:
                turn = await self._begin(scope, ticket, room)
                held = _Held(time.monotonic())
                note_session(turn.session.name)
            except asyncio.CancelledError:
                if claim is not None:
                    await self._settle(scope, claim, ticket.token, answered=False)
                raise
            holding()
            saved = kept = False
            try:
                await self._note_place(scope, account)
                system = await self._system_prompt(turn, parent)
                if on_begin is not None:
                    await on_begin()
                ran = False
                try:
                    with self.metrics.timed(TurnPart.MODEL):
                        added, text, shortened, context = await self._kept_alive(
                            turn,
                            held,
                            self._run(turn, system, user, on_text, meter, around, user_bytes=size),
                        )
                    await self._still_claimed(turn, held)
                    ran = True
                finally:  # the calls the API accepted cost tokens, whatever happened next
                    if not ran:
                        await self.ledger.charge(meter, account, turn.scope, turn.session.name)
                fitted, fitted_stored = self._fitted(added)
                stored = [user, *fitted]  # `user` is within the cap
                encoded = [user_stored, *fitted_stored]
                # The save adds the session's share of the charge; the server's counters are
                # in another place of the store (a Redis Cluster slot), counted meanwhile.
                charge = self.ledger.charge_of(meter, account, turn.scope, turn.session.name)
                usage = charge.usage if charge is not None else meter.usage()
                try:
                    with self.metrics.timed(TurnPart.STORE):
                        if charge is None:  # nothing to count: no tasks for a gather
                            outcome: bool | BaseException = await self._save(
                                turn, stored, user_ref, charge, encoded
                            )
                        else:
                            outcome, _ = await asyncio.gather(
                                self._save(turn, stored, user_ref, charge, encoded),
                                self.ledger.charge_server(charge),
                                return_exceptions=True,
                            )
                    if isinstance(outcome, BaseException):
                        raise outcome
                    saved = kept = outcome
                except SessionCleared:  # the store released the lock
                    saved = True
            except asyncio.CancelledError:
                if claim is not None:
                    await self._settle(scope, claim, ticket.token, answered=False)
                raise
            finally:
                if not saved:
                    await self._release(turn)
            if not saved:
                raise LostTurn()
            if kept:
                added_bytes = sum(map(stored_bytes, encoded))
                self._summarize_if_due(turn, context, stored, added_bytes, account)
            return Reply(
                text=text,
                session=turn.session.name,
                shortened=shortened,
                kept=kept,
                without_history=not context.history_bytes and self._had_history(turn),
                usage=usage,
            )

    async def _admit(
        self,
        scope: str,
        claim: str | None,
        token: str,
        account: Account,
        subject: str = "This message",
    ) -> None:
        """Check the message against its account's limits, once: the process that holds the
        message (its claim, taken here) checks and charges it. A refused message is settled
        as answered, so nobody answers it later (the start-up catch-up included). A message
        admitted here is answered in full, whatever it costs (see `UsageLimits`)."""
        if not self._limits.usage.apply_to(account):
            return
        if claim is not None:
            await self._until_claimed(
                lambda: self._store.claim(scope, claim, token, self._limits.lock_ms)
            )
        now = self._clock()
        try:
            refusal = await self._store.admit(
                Admission(account, claim or token, now, self._limits.usage)
            )
        except BaseException:
            if claim is not None:  # handed back: another process (or a retry) checks it
                await self._settle(scope, claim, token, answered=False)
            raise
        if refusal is None:
            return
        if claim is not None:
            await self._settle(scope, claim, token, answered=True)
        raise OverLimit(refusal, self._limits.usage, now, subject)

    async def retry(
        self,
        scope: str,
        *,
        requester: str,
        manager: bool,
        order: int | None = None,
        on_text: TextSink | None = None,
        on_begin: Callable[[Exchange], Awaitable[None]] | None = None,
        parent: str | None = None,
        account: Account | None = None,
    ) -> Retried:
        """Answer the session's last question again, replacing its answer. Only its asker
        (`requester`), or a `manager`, may. It takes its place among the scope's turns like
        a message (`order`, default now) and holds the lock throughout, so it never races a
        turn; the model gets the history up to and including that question, as the turn
        had, under the place's persona as it is now (`parent` as for `reply`). `on_begin`
        gets the exchange (where its old answer went) before the model runs. Nothing is
        changed unless the new answer is saved. Its tokens are charged to `account` (the
        person who asked for it), as a turn's are, whether or not it is saved; it is
        admitted against that account's limits like a message (`OverLimit`), so a member
        over a limit cannot go on spending through retries."""
        budget = self._limits.budget_bytes
        room_all = history_room(self._limits.system_prompt, {"role": "user", "content": ""}, budget)
        async with self._rewriting(scope, order, room_all) as (turn, held):
            exchange = await self._last_exchange(turn, "retry", requester, manager)
            if account is not None:
                admission = f"retry:{order}" if order is not None else new_token()
                await self._admit(scope, None, admission, account, "This retry")
            earlier = await self._history_before(turn, exchange)
            if on_begin is not None:
                await on_begin(exchange)
            system = await self._system_prompt(turn, parent)
            measured = sum(message_size(m) for m in earlier)
            pending = (
                None if turn.pending is None else max(0, turn.pending - len(exchange.messages))
            )
            replayed = replace(
                turn, recent=earlier, recent_bytes=measured, as_stored=False, pending=pending
            )
            async with self.ledger.metered(account, turn.scope, turn.session.name) as meter:
                added, text, shortened, _ = await self._kept_alive(
                    turn, held, self._run(replayed, system, exchange.user, on_text, meter)
                )
            await self._rewrite(turn, exchange, self._within_size(added), "retry")
        return Retried(text=text, exchange=exchange, shortened=shortened)

    async def undo(
        self, scope: str, *, requester: str, manager: bool, order: int | None = None
    ) -> Exchange:
        """Remove the session's last exchange (question, answer, tool messages between) and
        return it. Only its asker (`requester`), or a `manager`, may; it waits for the
        scope's turns as `retry` does."""
        async with self._rewriting(scope, order, 0) as (turn, _):
            exchange = await self._last_exchange(turn, "undo", requester, manager)
            await self._rewrite(turn, exchange, None, "undo")
        return exchange

    async def note_answer(self, scope: str, ref: str, replies: list[str]) -> None:
        """Remember where the answer to `ref` went, for /retry to edit; after a storage
        fault, a retry posts its answer anew instead."""
        try:
            await self._store.note_answer(scope, ref, replies)
        except StoreUnavailable:
            log.warning("could not record where an answer went: storage unavailable")

    @contextlib.asynccontextmanager
    async def _rewriting(
        self, scope: str, order: int | None, room: int
    ) -> AsyncIterator[tuple[Turn, _Held]]:
        """Hold the session as a turn does (its place in the scope's queue, then its lock),
        for a rewrite of its last exchange; the lock is released when the body fails (the
        rewrite itself releases it otherwise)."""
        ticket = Ticket(order=order) if order is not None else Ticket.now()
        if self._draining:
            raise Stopping()
        with self._working_on() as holding:
            turn = await self._begin(scope, ticket, room)
            holding()
            try:
                yield turn, _Held(time.monotonic())
            except BaseException:
                await self._release(turn)
                raise

    async def _last_exchange(
        self, turn: Turn, action: Rewrite, requester: str, manager: bool
    ) -> Exchange:
        exchange = await self._store.last_exchange(turn)
        if exchange is None:
            raise NothingToRewrite(action, "this conversation has no question yet")
        if not exchange.answered:
            raise NothingToRewrite(action, "its last message is not an answered question")
        if not manager and speaker_of(exchange.user)[0] != requester:
            raise NotYourExchange(action)
        return exchange

    async def _history_before(self, turn: Turn, exchange: Exchange) -> list[Message]:
        """The history before the exchange: from the turn's window when it holds the whole
        exchange (as it does unless the exchange alone is over the budget), else read."""
        count = len(exchange.messages)
        if list(turn.recent[-count:]) == list(exchange.messages):
            return list(turn.recent[:-count])
        history = await self._store.read_history(turn.scope, turn.session.name)
        return history[:-count] if history[-count:] == list(exchange.messages) else []

    async def _rewrite(
        self, turn: Turn, exchange: Exchange, answer: list[Message] | None, action: Rewrite
    ) -> None:
        """Save the rewrite (trying again on a storage fault, as a turn's save does; a
        repeat is harmless). The store releases the lock whatever the outcome."""
        try:
            for pause in SAVE_RETRY_PAUSES:
                try:
                    saved = await self._store.rewrite_last_exchange(turn, exchange, answer)
                    break
                except StoreUnavailable:
                    log.warning(
                        "saving /%s failed: storage unavailable; retrying in %ss", action, pause
                    )
                    await asyncio.sleep(pause)
            else:
                saved = await self._store.rewrite_last_exchange(turn, exchange, answer)
        except SessionCleared:
            raise ExchangeChanged(action, cleared=True) from None
        if not saved:
            raise ExchangeChanged(action)

    async def places_to_catch_up(
        self,
        newest: Callable[[str], int | None],
        oldest: int,
        serves: Callable[[str | None], bool] = lambda server: True,
    ) -> list[tuple[str, int]]:
        """Where a message may wait that was addressed to the bot while no process ran: the
        places answered in recently (most recently first), each with the id after which to
        read, past both the last message answered there and `oldest` (the first message id
        young enough to answer). `newest(scope)` is the newest message id known without
        asking (None: unknown); a place where it is not newer is left alone, so an idle
        place costs nothing. So is a place of a server this process does not serve
        (`serves(server)` False; the server is None when not recorded): another process
        catches up there."""
        found: list[tuple[str, int]] = []
        for place in await self._store.recent_places():
            if not serves(place.server):
                continue
            scope = place.scope
            known = newest(scope)
            if known is not None and known <= oldest:
                continue
            last = await self._store.scope_option(scope, LAST_ANSWERED_OPTION)
            after = max(oldest, int(last)) if last is not None and last.isdigit() else oldest
            if known is None or known > after:
                found.append((scope, after))
        return found

    async def last_answered(self, scope: str) -> int | None:
        """The newest message answered in `scope` (a Discord message id), None when unknown:
        where what the session already holds of the place ends."""
        return answered_id(await self._store.scope_option(scope, LAST_ANSWERED_OPTION))

    async def _save(
        self,
        turn: Turn,
        added: list[Message],
        user_ref: str | None,
        usage: Charge | None = None,
        encoded: list[str] | None = None,
    ) -> bool:
        """Save the turn, trying again on a storage fault: the model's answer is in hand, and
        saving is idempotent (a repeated save of the same turn stores nothing twice, nor
        charges `usage` twice), so a brief outage or a lost reply does not lose it."""
        for pause in SAVE_RETRY_PAUSES:
            try:
                return await self._store.finish_turn(turn, added, user_ref, usage, encoded)
            except StoreUnavailable:
                log.warning("saving a turn failed: storage unavailable; retrying in %ss", pause)
                await asyncio.sleep(pause)
        return await self._store.finish_turn(turn, added, user_ref, usage, encoded)

    def _within_size(self, messages: list[Message]) -> list[Message]:
        return self._fitted(messages)[0]

    def _fitted(self, messages: list[Message]) -> tuple[list[Message], list[str]]:
        """The messages to store (each within the cap; see `within_size`) and their stored
        forms, each encoded once: measuring it did, and the store is handed it."""
        cap = self._limits.message_cap_bytes
        fitted: list[Message] = []
        encoded: list[str] = []
        cut = False
        for message in messages:
            kept, stored = fitted_and_stored(message, cap)
            fitted.append(kept)
            encoded.append(stored)
            cut = cut or kept is not message
        if cut:
            log.warning("a turn's answer was over %s KB per message; stored cut", cap // 1024)
            paired = paired_tool_messages(fitted)
            return paired, list(map(encode_message, paired))
        return messages, encoded

    async def forget(self, scope: str, user_ref: str) -> bool:
        """Remove a stored user message (its author deleted it); False if none was stored."""
        return await self._store.forget_message(scope, user_ref)

    @contextlib.asynccontextmanager
    async def claimed(
        self, scope: str, claim: str, account: Account | None = None
    ) -> AsyncIterator[None]:
        """Hold a message while acting on it outside a turn (the threads mode opens a thread,
        then answers there): a lease renewed while the body runs, settled as answered when
        it ends, handed back when it is cancelled. While another process has the message in
        progress this waits, as a turn does; `AlreadyClaimed` once it was answered. The
        message is checked against `account`'s limits before the body runs (`OverLimit`)."""
        token, lease_ms = new_token(), self._limits.lock_ms
        with self._working_on() as holding:
            if account is not None:  # it takes the claim, and settles it when refused
                await self._admit(scope, claim, token, account)
            await self._until_claimed(lambda: self._store.claim(scope, claim, token, lease_ms))
            holding()
            async with self._renewed(scope, claim, token, account):
                yield

    @contextlib.asynccontextmanager
    async def _renewed(
        self, scope: str, claim: str, token: str, account: Account | None
    ) -> AsyncIterator[None]:
        """Renew the claim's lease while the body runs; settle it when the body ends."""
        lease_ms = self._limits.lock_ms

        async def renew() -> None:
            while True:
                await asyncio.sleep(lease_ms / 3000)
                try:
                    await self._store.claim(scope, claim, token, lease_ms)
                except AlreadyClaimed:
                    return
                except StoreUnavailable:
                    log.warning("could not renew the claim on a message: storage unavailable")

        renewer = asyncio.create_task(renew())
        answered = True
        try:
            await self._note_place(scope, account)
            yield
        except asyncio.CancelledError:
            answered = False
            raise
        finally:
            renewer.cancel()
            await self._settle(scope, claim, token, answered=answered)

    async def _until_claimed(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call `attempt` until it gets past a claim in progress elsewhere: that holder
        either answers (`AlreadyClaimed(answered=True)` is raised then) or dies, and its
        lease lapses."""
        waiting = False
        while True:
            try:
                return await attempt()
            except AlreadyClaimed as claimed:
                waiting = await self._wait_for_claim(claimed, waiting)

    async def _wait_for_claim(self, claimed: AlreadyClaimed, waiting: bool) -> bool:
        """Raise `claimed` if its message was answered, else wait a poll for its holder (said
        once per wait: `waiting`); True, as the caller is now waiting."""
        if claimed.answered:
            raise claimed
        if not waiting:
            log.debug("a message here is being answered by another process; waiting")
        await asyncio.sleep(self._limits.claim_poll_seconds)
        return True

    async def _note_place(self, scope: str, account: Account | None) -> None:
        """Remember the place, and its server, for the start-up catch-up, at most once a
        minute per place."""
        if not self._places_noted.due(scope):
            return
        self._places_noted.noted(scope)
        try:
            await self._store.note_place(scope, account.server if account else None)
        except StoreUnavailable:
            log.warning("could not note a place answered in: storage unavailable")

    async def _settle(self, scope: str, claim: str, token: str, *, answered: bool) -> None:
        try:
            await self._store.settle_claim(scope, claim, token, answered=answered)
        except StoreUnavailable:
            log.warning("could not settle the claim on a message; its lease expires by itself")

    async def _begin(self, scope: str, ticket: Ticket, room: int) -> Turn:
        """Wait for the scope's earlier turns, polling with a short backoff, and for the
        message's claim while another process has it in progress (`_wait_for_claim`, as
        `_until_claimed` waits, without its closure: every turn comes here). The store loads
        only the history that fits `room`, which is all that will be sent."""
        limits, store = self._limits, self._store
        deadline: float | None = None
        pause = 0.005
        waiting = False
        started = time.perf_counter()
        while True:
            last_try = time.perf_counter()
            try:
                turn = await store.begin_turn(scope, ticket, room, limits.lock_ms)
            except AlreadyClaimed as claimed:
                waiting = await self._wait_for_claim(claimed, waiting)
                continue
            except SessionBusy:
                waiting = False
                deadline = deadline or time.monotonic() + limits.wait_seconds
                if time.monotonic() + pause > deadline:
                    if ticket.claim is not None:  # the user is told: answered
                        await self._settle(scope, ticket.claim, ticket.token, answered=True)
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, BUSY_POLL_MAX_SECONDS)
                continue
            loaded = time.perf_counter()
            self.metrics.part_took(TurnPart.QUEUE, last_try - started)
            self.metrics.part_took(TurnPart.STORE, loaded - last_try)
            return turn

    async def _system_prompt(self, turn: Turn, parent: str | None) -> str:
        """The turn's system prompt. The scope's own persona came with the turn; a parent's
        is in another place of the store (another Redis hash slot), so a thread without a
        persona of its own asks for it: one more read, never cached, so it is current."""
        persona = turn.persona
        if persona is None and parent is not None:
            persona = await self._store.scope_option(parent, PERSONA_OPTION) or None
        limits = self._limits
        return system_prompt(limits.system_prompt, persona, limits.persona_note)

    async def _run(
        self,
        turn: Turn,
        system: str,
        user: Message,
        on_text: TextSink | None,
        meter: UsageMeter,
        around: ChannelContextSource | None = None,
        *,
        user_bytes: int | None = None,
    ) -> tuple[list[Message], str, bool, Context]:
        """Call the model; when the provider says the context is too long, once more with
        half of the history that was sent. `around` is read once, before the first call;
        `user_bytes` is `user`'s stored size, when the caller measured it."""
        recent, budget = self._unsummarized(turn), self._limits.budget_bytes
        measured = turn.recent_bytes if len(recent) == len(turn.recent) else None
        extra = None
        if around is not None:
            found = await around(turn.scope, turn.last_answered)
            extra = channel_context_message(found, self._limits.channel_context_bytes)
        for shortened in (False, True):
            context = build_context(
                system,
                turn.summary.text if turn.summary else None,
                () if extra is None else (extra,),
                recent,
                user,
                budget,
                recent_bytes=measured,
                as_stored=turn.as_stored,
                user_bytes=user_bytes,
            )
            try:
                added, text = await self._call_model(
                    context.messages, turn.session.settings, on_text, meter
                )
                return added, text, shortened, context
            except ContextTooLong:
                if shortened or not context.history_bytes:
                    raise
                log.warning(
                    "context too long for %s; retrying with half",
                    self._usable_model(turn.session.settings.model),
                )
                budget = context.total_bytes - context.history_bytes // 2
                measured = None
        raise AssertionError("unreachable")

    @staticmethod
    def _unsummarized(turn: Turn) -> list[Message]:
        """The turn's recent messages that its summary does not cover."""
        if turn.pending is None or turn.pending >= len(turn.recent):
            return turn.recent
        return turn.recent[len(turn.recent) - turn.pending :]

    @staticmethod
    def _had_history(turn: Turn) -> bool:
        """Whether the session held messages the summary does not cover (sent or not)."""
        return (turn.session.message_count if turn.pending is None else turn.pending) > 0

    def _summarize_if_due(
        self,
        turn: Turn,
        context: Context,
        stored: list[Message],
        added_bytes: int,
        account: Account | None,
    ) -> None:
        """After a saved turn, bring the summary up to date in the background when the history
        no longer fits (some was left out) or soon will not: the oldest uncovered messages
        are folded in, all but the newest that fill half the room the budget leaves history.
        One summary at a time per scope in this process (the store's lease covers the
        others); none while shutting down. Its tokens are charged to the turn's `account`.
        `added_bytes` is the stored size of `stored` (measured as it was fitted)."""
        scope = turn.scope
        if not self._limits.summaries or self._draining or scope in self._summarizing:
            return
        if time.monotonic() < self._summary_paused.get(scope, 0.0):
            return
        recent = self._unsummarized(turn)
        pending = turn.session.message_count if turn.pending is None else turn.pending
        left_out = context.history_from > 0 or pending > len(recent)
        room = context.history_room
        if not left_out and context.history_bytes + added_bytes <= room * SUMMARY_START_SHARE:
            return
        keep, used = 0, 0
        for message in reversed([*recent[context.history_from :], *stored]):
            used += message_size(message)
            if used > room // 2:
                break
            keep += 1
        task = asyncio.create_task(
            self._summarize(
                scope,
                turn.session.name,
                self._usable_model(turn.session.settings.model),
                keep,
                account,
            )
        )
        self._summarizing[scope] = task
        task.add_done_callback(lambda _: self._summarizing.pop(scope, None))

    async def _summarize(
        self, scope: str, name: str, model: str, keep: int, account: Account | None
    ) -> None:
        """Fold older messages into the summary; a failure leaves the history cut as before
        (nothing is lost: the messages stay stored) and is logged as one line."""
        try:
            await self.summaries.fold(scope, name, model, keep, account)
        except SummaryInProgress:
            pass
        except BotError as error:
            self._summary_paused[scope] = time.monotonic() + SUMMARY_RETRY_SECONDS
            if len(self._summary_paused) > 10_000:
                self._summary_paused.clear()
            log.warning(
                "no summary of older messages in %s (%s); they are left out of what is sent",
                scope,
                error,
            )
        except Exception:
            log.exception("summarizing older messages in %s failed unexpectedly", scope)

    def _usable_model(self, stored: str) -> str:
        """The session's model, or the default when it is no longer allowed (logged once per
        process and model, not once per turn)."""
        models = self._limits.models
        if models is None:
            return stored
        note = models.retired_note(stored)
        if note is not None and stored not in self._retired_logged and len(stored) <= 100:
            self._retired_logged.add(stored)
            log.warning(
                "sessions stored with model %s, no longer in ALLOWED_MODELS, are answered by %s",
                stored,
                models.default,
            )
        return models.usable(stored)

    async def _call_model(
        self,
        context: list[Message],
        settings: SessionSettings,
        on_text: TextSink | None,
        meter: UsageMeter,
    ) -> tuple[list[Message], str]:
        """The messages the run added and the answer's text; an empty answer is a failure,
        so a reply the SDK could not parse is never saved as a silent turn."""
        model = self._usable_model(settings.model)
        if on_text is None:
            added = paired_tool_messages(
                await self._model.complete(context, model, settings.mcp_servers, meter)
            )
            answers = [m for m in added if m.get("role") == "assistant" and m.get("content")]
            text = str(answers[-1]["content"]) if answers else ""
        else:
            text = await self._model.stream(context, model, settings.mcp_servers, on_text, meter)
            added = [{"role": "assistant", "content": text}]
        if not text:
            raise EmptyAnswer()
        return added, text

    async def _kept_alive(self, turn: Turn, held: _Held, work: Awaitable[T]) -> T:
        """Run `work` while renewing the session lock (and the claim's lease), so only a dead
        process's lock expires. When a renewal fails because another process took the message
        over (this one was frozen past its lease), `work` is cancelled: `AnsweredElsewhere`.
        `work` runs in this task (no task of its own per turn): a take-over cancels this task,
        and that one cancellation is taken back as it turns into `AnsweredElsewhere`."""
        interval = self._limits.lock_ms / 3000
        run = asyncio.current_task()
        assert run is not None
        taken_over = False

        async def renew() -> None:
            nonlocal taken_over
            while True:
                try:
                    if not await self._store.extend_lock(turn, self._limits.lock_ms):
                        if await self._taken_over(turn) and not finished:
                            taken_over = True
                            run.cancel()
                        return
                    held.at = time.monotonic()
                except StoreUnavailable:
                    log.warning("could not renew the lock of a turn: storage unavailable")
                await asyncio.sleep(interval)

        # Most turns end long before the first renewal: a timer, not a task, until then.
        renewer: asyncio.Task[None] | None = None

        def start_renewing() -> None:
            nonlocal renewer
            renewer = asyncio.create_task(renew())

        finished = False
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + interval, start_renewing)
        try:
            return await work
        except asyncio.CancelledError:
            if taken_over and run.uncancel() == 0:  # only the take-over's cancellation
                raise AnsweredElsewhere() from None
            raise
        finally:
            finished = True
            timer.cancel()
            if renewer is not None:
                renewer.cancel()

    async def _still_claimed(self, turn: Turn, held: _Held) -> None:
        """Before saving, when the lease may have lapsed unseen (the process stalled, and its
        renewals with it), take it again, or learn that another process took the message
        over: `AnsweredElsewhere` then, and nothing is saved."""
        if turn.claim is None or time.monotonic() - held.at < self._limits.lock_ms / 1500:
            return
        if await self._taken_over(turn):
            raise AnsweredElsewhere()

    async def _taken_over(self, turn: Turn) -> bool:
        """Whether another process holds or answered this turn's message; if nobody took it,
        this turn holds its lease again (its save is still fenced by the session's version)."""
        if turn.claim is None:
            return False
        try:
            await self._store.claim(turn.scope, turn.claim, turn.lock_token, self._limits.lock_ms)
        except AlreadyClaimed:
            return True
        except StoreUnavailable:
            log.warning("could not check the claim of a stalled turn: storage unavailable")
        return False

    async def _release(self, turn: Turn) -> None:
        try:
            await self._store.finish_turn(turn, [])
        except StoreUnavailable:
            log.warning("could not release a failed turn's lock; it expires by itself")
