"""`python -m benchmarks [--quick] [--out PATH]`: run every benchmark and write the report.

The full run takes a few minutes and writes BENCHMARKS.md at the repository root; `--quick`
runs tiny sizes in well under a minute (what the test does, with `--out` elsewhere)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

from benchmarks import breakdown, end_to_end, overhead, peers, roundtrips, scaling, tokens
from benchmarks.common import POLICY, Conversation, flush, redis_server, seed
from benchmarks.end_to_end import Timing
from benchmarks.overhead import Grid
from benchmarks.peers import PeerPlan, Workload
from benchmarks.report import Results, machine_info, render
from bot.runtime import tune_garbage_collection
from bot.store.redis import RedisStore
from tests.redis_cluster import RedisClusterNodes

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    grid: Grid
    compare: tuple[int, int]
    """(stored sessions, history) for the comparison with the JSON file."""
    round_trip_histories: tuple[int, ...]
    round_trip_turns: int
    ping_samples: int
    channels: int
    channel_turns: int
    channel_history: int
    sdk_turns: int
    discord_messages: int
    token_turns: int
    token_budget: int
    """Tokens sent per turn: how many turns, within what context budget (in tokens)."""
    peers: PeerPlan
    idle_sessions: int
    """Stored beside the channels in a second Redis run of them: peak RSS flat in sessions."""
    quick: bool = False
    scaling_processes: tuple[int, ...] = (1, 2, 4)


FULL = Plan(
    grid=Grid(
        sessions=(100, 10_000),
        histories=(10, 100, 200, 1000),
        measured=100,
        turns=1000,
        warmup=50,
        json_turns=5,
        json_seconds=5.0,  # one turn at 10,000 sessions (5-10 s each), five at 100
        passes=4,
    ),
    compare=(1000, 100),
    round_trip_histories=(10, 1000),
    round_trip_turns=400,
    ping_samples=2000,
    channels=1000,
    channel_turns=5,
    channel_history=20,
    sdk_turns=100,
    discord_messages=20,
    token_turns=500,
    token_budget=16_000,
    peers=PeerPlan(
        workloads=(Workload(1000, 100), Workload(10_000, 10)),
        first_turns=300,
        steady_sessions=50,
        rounds=8,
        trips_turns=6,
        json_turns=5,
        json_seconds=8.0,
    ),
    idle_sessions=10_000,
)

QUICK = Plan(
    grid=Grid(
        sessions=(20, 60),
        histories=(10, 100, 200, 1000),
        measured=10,
        turns=20,
        warmup=5,
        json_turns=2,
        json_seconds=1.0,
        passes=2,
    ),
    compare=(40, 100),
    round_trip_histories=(10, 1000),
    round_trip_turns=20,
    ping_samples=50,
    channels=50,
    channel_turns=2,
    channel_history=20,
    sdk_turns=3,
    discord_messages=3,
    token_turns=60,
    token_budget=2_000,
    peers=PeerPlan(
        workloads=(Workload(40, 100), Workload(60, 10)),
        first_turns=10,
        steady_sessions=5,
        rounds=2,
        warmup=2,
        trips_turns=3,
        json_turns=2,
        json_seconds=1.0,
    ),
    idle_sessions=200,
    quick=True,
)


class Progress:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f} s] {text}", file=sys.stderr, flush=True)


def _concurrency(
    url: str, plan: Plan, backend: str, cache_mb: int | None, idle: int = 0
) -> dict[str, object]:
    """One child process per run, so each peak RSS is the run's own. `idle`: that many
    sessions are already stored (by the parent) and stay idle beside the channels."""
    command = [sys.executable, "-m", "benchmarks.concurrency", "--backend", backend]
    command += ["--url", url, "--channels", str(plan.channels)]
    if cache_mb is not None:
        command += ["--cache-mb", str(cache_mb)]
    command += ["--turns", str(plan.channel_turns), "--history", str(plan.channel_history)]
    if idle:
        command.append("--keep")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads(done.stdout)
    result["stored"] = plan.channels + idle
    return result


async def _store_idle(url: str, conversation: Conversation, count: int) -> None:
    """`count` idle sessions of 10 to 100 messages, as the per-turn grid stores them."""
    await flush(url)
    store = RedisStore.from_url(url, POLICY)
    try:
        idle = overhead.background(count, 0)
        await seed(store, [(scope, conversation.history(n)) for scope, n in idle])
    finally:
        await store.close()


async def run(plan: Plan, command: str) -> Results:
    progress = Progress()
    conversation = Conversation()
    load_before = os.getloadavg()
    results = Results(command=command, grid=plan.grid, compare=plan.compare, quick=plan.quick)
    with redis_server() as server:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        version = str((await client.info("server"))["redis_version"])
        await client.aclose()
        results.machine = machine_info(version)
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        results.machine = {"Date": when, **results.machine}

        for backend in ("redis", "sqlite"):
            results.cells += await overhead.store_cells(
                backend, server.url, plan.grid, conversation, progress
            )
        results.two_processes = await overhead.two_processes_cell(
            server.url, plan.grid, conversation, max(plan.grid.histories), progress
        )
        compare_sessions, compare_history = plan.compare
        for backend in ("redis", "sqlite"):
            results.compared += await overhead.store_cells(
                backend,
                server.url,
                plan.grid,
                conversation,
                progress,
                sessions_list=[compare_sessions],
                histories=[compare_history],
                background_length=compare_history,
            )

        results.peers = await peers.measure(
            server.url, server.port, plan.peers, conversation, progress
        )

        progress("a bare round trip, a long reply, decoding")
        results.ping = Timing("ping", await breakdown.ping_ns(server.url, plan.ping_samples))
        longest = max(plan.grid.histories)
        cell = next((c for c in results.cells if c.history == longest), None)
        if cell is not None:
            loaded = round(cell.sent) - 2
            results.decode_ms = breakdown.decode_ns(conversation, loaded) / 1e6
            reply = await breakdown.bulk_reply_ns(
                server.url, conversation, loaded, plan.ping_samples
            )
            results.bulk_reply = Timing("bulk reply", reply)

        progress("a first turn, part by part, beside the hand-written list")
        results.first_turn = await breakdown.first_turn_parts(
            server.url, conversation, min(plan.compare[0], 100), plan.compare[1]
        )

        for history in plan.round_trip_histories:
            progress(f"round trips at {history} messages")
            results.round_trips.append(
                await roundtrips.count(server.port, conversation, history, plan.round_trip_turns)
            )

        for backend, cache_mb in (("redis", None), ("redis", 0), ("sqlite", None)):
            progress(f"{plan.channels} channels at once: {backend}")
            results.concurrency.append(_concurrency(server.url, plan, backend, cache_mb))
        progress(f"{plan.channels} channels at once beside {plan.idle_sessions} idle sessions")
        await _store_idle(server.url, conversation, plan.idle_sessions)
        results.concurrency.append(
            _concurrency(server.url, plan, "redis", None, idle=plan.idle_sessions)
        )
        await flush(server.url)

        progress(f"tokens sent per turn over {plan.token_turns} turns")
        results.tokens = await tokens.measure(server.url, plan.token_turns, plan.token_budget)
        results.token_budget = plan.token_budget

        for n in plan.scaling_processes:
            progress(f"{n} process(es) sharing one Redis")
            await flush(server.url)
            results.scaling.append(
                scaling.run("redis", server.url, n, plan.channels, plan.channel_turns)
            )
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as directory:
            cluster = RedisClusterNodes(Path(directory))
            try:
                for n in plan.scaling_processes:
                    progress(f"{n} process(es) sharing a three-node Redis Cluster")
                    cluster.flush()
                    results.scaling.append(
                        scaling.run(
                            "redis-cluster", cluster.url, n, plan.channels, plan.channel_turns
                        )
                    )
            finally:
                cluster.stop()

        progress("the real SDK against the fake Dedalus API")
        await flush(server.url)
        results.sdk = await end_to_end.sdk_turns(server.url, plan.sdk_turns)
        progress("messages through the fake Discord")
        await flush(server.url)
        results.discord = await end_to_end.discord_messages(
            server.url, server.port, plan.discord_messages
        )

        # Last: the JSON files take gigabytes of memory at the larger sizes.
        results.compared += await overhead.json_cells(
            plan.grid,
            conversation,
            progress,
            sessions_list=[compare_sessions],
            histories=[compare_history],
            background_length=compare_history,
        )
        results.cells += await overhead.json_cells(plan.grid, conversation, progress)
    load_after = os.getloadavg()
    results.machine["Load average (1 min) at start and end"] = (
        f"{load_before[0]:.2f}, {load_after[0]:.2f}"
    )
    results.seconds = time.monotonic() - progress.start
    progress("done")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "BENCHMARKS.md", help="where to write the report"
    )
    args = parser.parse_args()
    command = " ".join(["python -m benchmarks", *sys.argv[1:]])
    tune_garbage_collection()  # every candidate measured in the bot's kind of process
    results = asyncio.run(run(QUICK if args.quick else FULL, command))
    args.out.write_text(render(results))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
