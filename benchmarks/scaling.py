"""Throughput past one process: 1, 2 and 4 bot processes (engines with the instant model)
sharing one store, each talking in its own share of the channels at once, on one Redis and
on a three-node Redis Cluster.

Each process seeds its channels, says it is ready, and starts when the parent says go, so
the turns of all of them overlap. Turns per second are all turns over the time from the
first start to the last end; the per-turn percentiles are over every turn of every process.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scaling:
    store: str
    processes: int
    channels: int
    turns: int
    failed: int
    turns_per_second: float
    p50_ms: float
    p99_ms: float


def run(store: str, url: str, processes: int, channels: int, turns_each: int) -> Scaling:
    share = channels // processes
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.concurrency",
                "--backend",
                store,
                "--url",
                url,
                "--channels",
                str(share),
                "--turns",
                str(turns_each),
                "--first-channel",
                str(i * share),
                "--shared",
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    for child in children:  # each has seeded its channels
        assert child.stderr is not None
        line = child.stderr.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a benchmark process failed: {line}{child.stderr.read()[-2000:]}")
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    results = []
    for child in children:
        out, err = child.communicate(timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"a benchmark process failed:\n{err[-2000:]}")
        results.append(json.loads(out))
    latencies = sorted(x for r in results for x in r["latencies"])
    done = sum(r["turns_ok"] for r in results)
    wall = max(r["ended_at"] for r in results) - min(r["started_at"] for r in results)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Scaling(
        store=store,
        processes=processes,
        channels=share * processes,
        turns=done,
        failed=sum(r["turns_failed"] for r in results),
        turns_per_second=done / wall if wall > 0 else 0.0,
        p50_ms=statistics.median(latencies) * 1000 if latencies else 0.0,
        p99_ms=cuts[98] * 1000,
    )
