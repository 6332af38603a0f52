"""What the SQLite store has on disk when it returns, as `SQLITE_SYNCHRONOUS` says: the flushes
(fsync, fdatasync) of its file, seen with strace, at each step of a turn and of a deletion.
With `full` a saved turn is flushed before the save returns, so a power failure cannot take
it; with `normal` (the default) the operating system writes it back later, so a power failure
may; a deletion a user asked for is flushed with either; the bookkeeping of a turn in progress
(its claim, place in the queue and lock) never is. A bad value stops start-up with one line
(`test_startup_and_secrets.py`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STEPS = """
import asyncio, os
from bot.config import load_settings
from bot.store import open_store
from bot.store.base import Ticket

def step(name):
    os.write(2, f"STEP {name}\\n".encode())

async def main():
    store = open_store(load_settings(dict(os.environ)))
    question = {"role": "user", "content": "[Ann (user id 1)]: hello"}
    answer = {"role": "assistant", "content": "Hello, Ann."}
    step("begin")
    turn = await store.begin_turn("discord:1", Ticket.now("1001"), 64_000, 15_000)
    step("save")
    assert await store.finish_turn(turn, [question, answer], "1001")
    step("delete")
    assert await store.forget_message("discord:1", "1001")
    step("end")
    await store.close()

asyncio.run(main())
"""
FLUSH = re.compile(r"\b(?:fsync|fdatasync)\(\d+<([^>]*)>")


def flushes_per_step(tmp_path: Path, **env: str) -> Counter[str]:
    """Run a turn and a deletion through the store the settings open, under strace; count
    the flushes of the SQLite file (and its journal) each step made."""
    strace = shutil.which("strace")
    if strace is None or subprocess.run([strace, "-o", os.devnull, "true"]).returncode != 0:
        pytest.skip("strace is not installed, or may not trace here")
    trace = tmp_path / "trace.txt"
    store = tmp_path / "sessions.sqlite3"
    traced = ["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,write", "-o", str(trace)]
    result = subprocess.run(
        [strace, *traced, sys.executable, "-c", STEPS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SQLITE_PATH": str(store), **env},
    )
    assert result.returncode == 0, result.stderr
    step, counts = "open", Counter[str]()
    for line in trace.read_text().splitlines():
        if (marked := re.search(r'write\(2<[^>]*>, "STEP (\w+)', line)) is not None:
            step = marked.group(1)
        elif (flushed := FLUSH.search(line)) is not None and str(store) in flushed.group(1):
            counts[step] += 1
    assert step == "end", trace.read_text()[-2000:]  # every step was seen
    return counts


@pytest.mark.parametrize("value", ["full", "normal", None])
def test_a_saved_turn_is_on_disk_when_saved_only_with_full(
    tmp_path: Path, value: str | None
) -> None:
    counts = flushes_per_step(tmp_path, **({} if value is None else {"SQLITE_SYNCHRONOUS": value}))
    assert counts["begin"] == 0  # claim, queue and lock: never waited for
    if value == "full":
        assert counts["save"] >= 1
    else:  # normal, the default
        assert counts["save"] == 0
    assert counts["delete"] >= 1  # what a user deletes is gone from the disk, either way
