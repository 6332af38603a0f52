"""What an operator watches: Prometheus metrics of turns, model and store errors, commands and
the gateway, served at `/metrics` by `bot.health`.

Label values come from fixed sets only (outcomes, parts of a turn, error classes, command
names, shard ids), never from content, people, places or secrets: those must not leave the
bot, and would make the number of series grow without bound. Each `Metrics` has its own
registry, so several bots in one process (the tests) never mix their counts.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    Sample,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bot.store.base import StoreStats

ACTIVE_SECONDS = 3600.0
"""`dcbot_places_active` counts the places this process answered in within this long."""

Readings = Callable[[], Iterable[tuple[str, float]]]
"""A gauge's (label value, reading) pairs, read when scraped."""

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class TurnOutcome(StrEnum):
    ANSWERED = "answered"
    NOT_KEPT = "not_kept"  # answered, but the session changed meanwhile: not stored
    REFUSED = "refused"  # too large, or the session was busy too long
    MODEL_ERROR = "model_error"
    STORE_UNAVAILABLE = "store_unavailable"
    ELSEWHERE = "answered_elsewhere"  # another process has or had the message
    HANDED_BACK = "handed_back"  # stopping, or cut short
    FAILED = "failed"  # any other error


class TurnPart(StrEnum):
    TOTAL = "total"
    QUEUE = "queue"  # waiting for the place's earlier turns or the session's lock
    STORE = "store"  # loading the history and saving the turn
    MODEL = "model"
    DISCORD = "discord"  # posting the finished answer


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.turns = Counter("dcbot_turns", "Turns by outcome.", ["outcome"], registry=registry)
        self._parts: dict[TurnPart, _Seconds] = {}
        """Each part's histogram, from the first time it was timed."""
        registry.register(_TurnSeconds(self._parts))
        self.model_errors = Counter(
            "dcbot_model_errors", "Failed model calls by kind.", ["kind"], registry=registry
        )
        self.interactions = Counter(
            "dcbot_interactions",
            "Slash commands and autocompletes this process ran, by command.",
            ["command"],
            registry=registry,
        )
        self._active: dict[str, float] = {}
        Gauge(
            "dcbot_places_active",
            "Channels, threads and DMs this process answered in during the last hour.",
            registry=registry,
        ).set_function(self._count_active)
        # Each series is looked up once, not on every turn (a `labels` call takes a lock and
        # builds a key); every outcome's exists from the start, at 0.
        self._turns = {outcome: self.turns.labels(outcome.value) for outcome in TurnOutcome}

    def turn_ended(self, outcome: TurnOutcome, seconds: float) -> None:
        self._turns[outcome].inc()
        self.part_took(TurnPart.TOTAL, seconds)

    def part_took(self, part: TurnPart, seconds: float) -> None:
        histogram = self._parts.get(part)
        if histogram is None:
            histogram = self._parts[part] = _Seconds()
        histogram.counts[bisect_left(_BOUNDS, seconds)] += 1
        histogram.total += seconds

    def place_answered(self, place: str) -> None:
        """Only counted, never exported: the label-free gauge reads how many there are."""
        self._active[place] = time.monotonic()
        if len(self._active) > 100_000:
            self._count_active()

    def timed(self, part: TurnPart) -> _Timed:
        """A block timed as `part` (however it ends)."""
        return _Timed(self, part)

    def watch_store(self, stats: StoreStats) -> None:
        self.registry.register(_StoreCollector(stats))

    def watch_gauge(
        self,
        name: str,
        documentation: str,
        label: str,
        read: Readings,
    ) -> None:
        """A gauge read when scraped (the gateway's latency per shard, say)."""
        self.registry.register(_ReadGauge(name, documentation, label, read))

    def _count_active(self) -> float:
        since = time.monotonic() - ACTIVE_SECONDS
        for place in [p for p, when in self._active.items() if when < since]:
            del self._active[place]
        return float(len(self._active))


class _Timed:
    """`Metrics.timed`: a plain class, cheaper than a generator-based context manager on
    every turn."""

    __slots__ = ("_metrics", "_part", "_started")

    def __init__(self, metrics: Metrics, part: TurnPart) -> None:
        self._metrics, self._part, self._started = metrics, part, 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self._metrics.part_took(self._part, time.perf_counter() - self._started)


_BOUNDS = (*SECONDS_BUCKETS, math.inf)
_LE = tuple(floatToGoString(bound) for bound in _BOUNDS)  # type: ignore[no-untyped-call]


class _Seconds:
    """One part's `dcbot_turn_seconds`: how many took at most each bound (the first bound not
    below it counts one), and their sum. A turn times five parts; prometheus_client's
    `Histogram.observe` takes two locks and makes three calls per observation, which a bot
    that counts and is scraped in one event loop does not need."""

    __slots__ = ("counts", "created", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.total = 0.0
        self.created = time.time()


class _TurnSeconds(Collector):
    """`dcbot_turn_seconds` as prometheus_client's `Histogram` exports it: each part timed so
    far, in the order first timed, as cumulative buckets, count, sum and creation time."""

    def __init__(self, parts: dict[TurnPart, _Seconds]) -> None:
        self._parts = parts

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "dcbot_turn_seconds", "Time of a turn and of its parts.", labels=["part"]
        )
        for part, histogram in list(self._parts.items()):
            counted = 0.0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(_LE, histogram.counts, strict=True):
                counted += count
                buckets.append((le, counted))
            family.add_metric([part.value], buckets, histogram.total)
            if getattr(prometheus_metrics, "_use_created", True):
                created = Sample(family.name + "_created", {"part": part.value}, histogram.created)
                family.samples.append(created)
        return [family]


class _StoreCollector(Collector):
    def __init__(self, stats: StoreStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        errors = CounterMetricFamily(
            "dcbot_store_errors", "Store calls that failed: storage unreachable or too slow."
        )
        errors.add_metric([], self._stats.unavailable)
        cache = CounterMetricFamily(
            "dcbot_history_cache",
            "Turns that found the session's recent messages in this process's memory (hit) "
            "or loaded them from Redis (miss).",
            labels=["result"],
        )
        cache.add_metric(["hit"], self._stats.cache_hits)
        cache.add_metric(["miss"], self._stats.cache_misses)
        return [errors, cache]


class _ReadGauge(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        read: Readings,
    ) -> None:
        self._name, self._documentation, self._label, self._read = name, documentation, label, read

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, reading in self._read():
            gauge.add_metric([value], reading)
        return [gauge]
