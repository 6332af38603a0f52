"""Per-turn overhead on Redis, SQLite and the reference JSON file, for a grid of stored
sessions and history lengths.

For each number of stored sessions N, `measured` of them (the same number for every N;
one per scope, as one Discord channel each) hold a history of H messages and take the
turns, round-robin; the other N - measured are stored but idle, with 10 to 100 messages
each. The stores for the different N are open side by side (a Redis database, or an SQLite
file, each) and take their turns in alternating blocks, so a slow spell of a shared
machine hits them alike. Within the context budget the measured sessions are re-seeded to
H messages before each block, so a turn sees H or H + 2 messages; beyond it they are not
(the budget, not the history, decides what is loaded), and grow by two messages a turn."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks import reference_json
from benchmarks.common import (
    BUDGET_BYTES,
    POLICY,
    Conversation,
    Phases,
    background_lengths,
    flush,
    mean_stored_bytes,
    percentile,
    run_turns,
    seed,
)
from bot.store.base import SessionStore
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore

Progress = Callable[[str], None]


@dataclass
class Cell:
    backend: str
    sessions: int
    history: int
    grown_to: int = 0
    """The longest history a measured turn saw (turns add two messages each)."""
    phases: Phases = field(default_factory=Phases)
    """Turns after a session's first in this process (steady state)."""
    first: Phases = field(default_factory=Phases)
    """Each session's first turn after it was stored: nothing of it cached in the process
    (as after a restart, or when another process replaced the session)."""
    file_bytes: int = 0
    """For the JSON pattern: the size of the file rewritten on every save."""

    @property
    def turns(self) -> int:
        return len(self.phases.total)

    def p(self, q: float, part: str = "total", *, first: bool = False) -> float:
        """Percentile `q` of a phase, in milliseconds (of first turns with `first`)."""
        values: Sequence[int] = getattr(self.first if first else self.phases, part)
        return percentile(values, q) / 1e6

    @property
    def summary(self) -> str:
        """The progress line of a finished cell."""
        return (
            f"{self.backend}: {self.sessions} sessions, {self.history} messages: "
            f"p50 {self.p(50):.3f} ms, p99 {self.p(99):.3f} ms ({self.turns} turns)"
        )

    @property
    def sent(self) -> float:
        return percentile(self.phases.sent_messages, 50)

    def add(self, phases: Phases) -> None:
        _extend(self.phases, phases)

    def first_add(self, phases: Phases) -> None:
        _extend(self.first, phases)


def _extend(into: Phases, more: Phases) -> None:
    for part in ("total", "load", "context", "save", "sent_messages"):
        getattr(into, part).extend(getattr(more, part))


@dataclass(frozen=True)
class Grid:
    sessions: tuple[int, ...]
    histories: tuple[int, ...]
    measured: int
    """Sessions taking turns in every cell (all of them when fewer are stored)."""
    turns: int
    """Recorded turns per cell (at least), after `warmup`."""
    warmup: int
    json_turns: int
    json_seconds: float
    """The JSON pattern takes seconds per turn at large sizes: no new turn once a cell has
    run this long (at least one turn; the report gives each cell's count)."""
    rounds_per_block: int = 2
    passes: int = 1
    """The grid is run this many times over, each pass with its share of the turns, so a
    slow spell of a shared machine (seconds long, now and then) does not land on the whole
    of one history length."""


def measured_scopes(sessions: Sequence[int], grid: Grid) -> list[str]:
    return [f"discord:{100_000 + i}" for i in range(min(grid.measured, *sessions))]


def background(sessions: int, measured: int, length: int | None = None) -> list[tuple[str, int]]:
    """The idle sessions: `length` messages each, else 10 to 100."""
    count = sessions - measured
    lengths = [length] * count if length is not None else background_lengths(count)
    return [(f"discord:{500_000 + i}", n) for i, n in enumerate(lengths)]


def _database(url: str, index: int) -> str:
    """The same server, database `index` (one per number of stored sessions)."""
    return url.rsplit("/", 1)[0] + f"/{index}"


async def store_cells(
    backend: str,
    redis_url: str,
    grid: Grid,
    conversation: Conversation,
    progress: Progress,
    *,
    sessions_list: Sequence[int] | None = None,
    histories: Sequence[int] | None = None,
    background_length: int | None = None,
) -> list[Cell]:
    """One cell per (stored sessions, history length) on `backend` ("redis" or "sqlite")."""
    counts = list(sessions_list or grid.sessions)
    scopes = measured_scopes(counts, grid)
    stores: list[SessionStore] = []
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as directory:
        if backend == "redis":
            await flush(redis_url)
        try:
            for index, sessions in enumerate(counts):
                store: SessionStore
                if backend == "redis":
                    store = RedisStore.from_url(_database(redis_url, index), POLICY)
                else:
                    store = SqliteStore(Path(directory) / f"sessions-{sessions}.sqlite3", POLICY)
                stores.append(store)
                idle = background(sessions, len(scopes), background_length)
                progress(f"{backend}: seeding {len(idle)} idle sessions")
                await seed(store, [(s, conversation.history(n)) for s, n in idle])
            share = replace(grid, turns=-(-grid.turns // grid.passes))
            by_history: dict[int, list[Cell]] = {}
            for _ in range(grid.passes):
                for history in histories or grid.histories:
                    done = await _interleaved(
                        backend, stores, counts, scopes, history, share, conversation
                    )
                    for cell, more in zip(by_history.setdefault(history, done), done, strict=True):
                        if cell is not more:
                            cell.add(more.phases)
                            cell.first_add(more.first)
                            cell.grown_to = max(cell.grown_to, more.grown_to)
            for history_cells in by_history.values():
                cells += history_cells
                for cell in history_cells:
                    progress(cell.summary)
        finally:
            for store in stores:
                await store.close()
    return cells


async def _interleaved(
    backend: str,
    stores: Sequence[SessionStore],
    counts: Sequence[int],
    scopes: Sequence[str],
    history: int,
    grid: Grid,
    conversation: Conversation,
) -> list[Cell]:
    """The cells of one history length, the stores taking turns block by block (in
    alternating order), re-seeding within the budget."""
    within_budget = history * mean_stored_bytes(conversation) < BUDGET_BYTES
    rounds = grid.rounds_per_block
    blocks = -(-(grid.turns + grid.warmup) // (rounds * len(scopes)))
    cells = [Cell(backend, n, history) for n in counts]
    since_seed = [0] * len(stores)
    for block in range(blocks):
        order = range(len(stores)) if block % 2 == 0 else reversed(range(len(stores)))
        for i in order:
            first: Phases | None = None
            if block == 0 or within_budget:
                await seed(stores[i], [(s, conversation.history(history)) for s in scopes])
                since_seed[i] = 0
                first = cells[i].first
            warmup = grid.warmup if block == 0 else 0
            played = rounds + (first is not None)
            cells[i].add(
                await run_turns(stores[i], conversation, scopes, played, warmup, first=first)
            )
            since_seed[i] += played
            cells[i].grown_to = history + 2 * (since_seed[i] - 1)
    return cells


async def two_processes_cell(
    redis_url: str, grid: Grid, conversation: Conversation, history: int, progress: Progress
) -> Cell:
    """Two processes (two stores, each with its own cache) answer the same sessions by
    turns, so each turn first fetches the two messages the other process added."""
    scopes = measured_scopes(grid.sessions, grid)
    await flush(redis_url)
    processes = [RedisStore.from_url(redis_url, POLICY) for _ in range(2)]
    cell = Cell("redis, 2 processes", len(scopes), history)
    try:
        await seed(processes[0], [(s, conversation.history(history)) for s in scopes])
        for store in processes:  # each process's first turns
            await run_turns(store, conversation, scopes, 1)
        rounds = -(-(grid.turns + grid.warmup) // (2 * len(scopes)))
        for round_index in range(rounds):
            for store in processes:
                warmup = grid.warmup if round_index == 0 and store is processes[0] else 0
                cell.add(await run_turns(store, conversation, scopes, 1, warmup))
        cell.grown_to = history + 2 * (2 + 2 * rounds - 1)
        progress(cell.summary)
    finally:
        for store in processes:
            await store.close()
    return cell


async def json_cells(
    grid: Grid,
    conversation: Conversation,
    progress: Progress,
    *,
    sessions_list: Sequence[int] | None = None,
    histories: Sequence[int] | None = None,
    background_length: int | None = None,
) -> list[Cell]:
    """The same cells through the reference pattern's JSON file."""
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-json-") as directory:
        path = Path(directory) / "sessions.json"
        counts = list(sessions_list or grid.sessions)
        scopes = measured_scopes(counts, grid)
        for sessions in counts:
            idle = background(sessions, len(scopes), background_length)
            for history in histories or grid.histories:
                stored = idle + [(s, history) for s in scopes]
                result = await reference_json.measure(
                    path, conversation, stored, scopes, grid.json_turns, grid.json_seconds
                )
                cell = Cell(
                    "json",
                    sessions,
                    history,
                    grown_to=history,
                    phases=result.phases,
                    file_bytes=result.file_bytes,
                )
                progress(
                    f"json: {sessions} sessions, {history} messages: "
                    f"p50 {cell.p(50):.1f} ms ({cell.turns} turns, "
                    f"file {result.file_bytes / 1e6:.0f} MB)"
                )
                cells.append(cell)
                await asyncio.sleep(0)
    return cells
