"""The benchmark command keeps working: a tiny run (`python -m benchmarks --quick`) writes a
report whose tables hold numbers. Nothing here asserts on how fast anything is."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.peers import (
    BENCH_EXTRA,
    JSON_FILE,
    LIST,
    OURS_REDIS,
    OURS_SQLITE,
    SDK_ROWS,
    sdk_missing,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(400)  # the first test runs the whole quick benchmark


def tables(report: str) -> dict[str, list[dict[str, str]]]:
    """Each section's table, as rows of header -> cell."""
    out: dict[str, list[dict[str, str]]] = {}
    for section in report.split("\n## ")[1:]:
        title, _, body = section.partition("\n")
        rows = [line for line in body.splitlines() if line.startswith("|")]
        if len(rows) < 2:
            continue
        header = [cell.strip() for cell in rows[0].strip("|").split("|")]
        out[title] = [
            dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))
            for row in rows[2:]
        ]
    return out


def number(cell: str) -> float:
    value = float(cell.split(" ")[0])
    assert math.isfinite(value) and value >= 0, cell
    return value


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


def test_the_report_names_the_machine_date_and_command(report: str) -> None:
    assert "**Command:** `python -m benchmarks --quick --out " in report
    for label in ("**Date:**", "**CPU:**", "**Python:**", "**Redis server:**"):
        assert label in report


def test_every_grid_cell_has_parseable_percentiles(report: str) -> None:
    rows = tables(report)["Per-turn overhead"]
    grid = [r for r in rows if r["Store"] in ("redis", "sqlite")]
    assert len(grid) == 2 * 2 * 4  # stores x stored-session counts x history lengths
    for row in grid:
        assert number(row["p50 ms"]) <= number(row["p99 ms"])
        for column in ("Load p50 ms", "Context p50 ms", "Save p50 ms", "Turns", "Sent"):
            number(row[column])
        assert number(row["First turns"]) >= 1  # every cell starts with a round of them
        number(row["First turn p50 ms"])
        number(row["First turn load p50 ms"])
    (shared,) = [r for r in rows if r["Store"] == "redis, 2 processes"]
    assert number(shared["p50 ms"]) <= number(shared["p99 ms"])


def test_round_trips_and_commands_are_counted(report: str) -> None:
    rows = tables(report)["Redis commands and round trips per turn"]
    assert [r["History"] for r in rows] == ["10", "1000"]
    for row in rows:
        assert number(row["Round trips / turn"]) >= 1
        assert number(row["Commands sent / turn"]) >= 1
        number(row["Run inside the scripts / turn"])
        number(row["Redis server µs / turn"])


def test_the_json_pattern_and_the_ratio_are_reported(report: str) -> None:
    rows = tables(report)["Against the reference pattern (one JSON file)"]
    assert len(rows) == 1 + 2 * 4
    for row in rows:
        assert number(row["JSON file MB"]) > 0
        assert number(row["JSON p50 ms"]) > 0
        assert number(row["JSON / Redis"]) > 0
        assert number(row["JSON / Redis first turn"]) > 0


def test_concurrency_end_to_end_and_targets_are_reported(report: str) -> None:
    found = tables(report)
    concurrent = found["Many channels at once"]
    assert [(r["Store"], r["Cache MB"], r["Stored sessions"]) for r in concurrent] == [
        ("redis", "32", "50"),
        ("redis", "0", "50"),
        ("sqlite", "-", "50"),
        ("redis", "32", "250"),  # beside 200 idle sessions
    ]
    for row in concurrent:
        number(row["Turns/s"])
        assert number(row["Peak RSS MB"]) > 0
    end_to_end = found["With the real clients (for context; not the bot's own overhead)"]
    assert len(end_to_end) == 4
    for row in end_to_end:
        number(row["p50 ms"])
    targets = found["Targets"]
    assert len(targets) == 9
    assert targets[0]["Met"].startswith(("yes", "**no**"))  # round trips: counted at any size


def test_one_two_and_four_processes_are_measured_on_redis_and_on_a_cluster(report: str) -> None:
    rows = tables(report)["Past one process"]
    assert [(r["Store"], r["Processes"]) for r in rows] == [
        (store, n) for store in ("redis", "redis-cluster") for n in ("1", "2", "4")
    ]
    for row in rows:
        assert number(row["Turns"]) > 0 and row["Failed"] == "0", row
        assert number(row["Turns/s"]) > 0
        assert number(row["p50 ms"]) <= number(row["p99 ms"])


def test_a_quick_run_says_so_and_judges_no_size_dependent_target(report: str) -> None:
    """Tiny sizes cannot show the JSON file 1,000x slower or a flat cost; a quick run must not
    report those as missed, and must say it is a quick run."""
    assert report.startswith("# Benchmarks (quick run)\n")
    targets = tables(report)["Targets"]
    for row in targets[1:]:
        assert row["Met"].startswith("not judged (quick run"), row


def test_the_report_opens_with_a_summary_in_plain_words(report: str) -> None:
    summary = report.split("\n## In short\n", 1)[1].split("\n## ", 1)[0]
    for phrase in ("per message", "ms with Redis", "ms with SQLite", "messages per second"):
        assert phrase in summary
    assert "begin_turn" not in summary and "finish_turn" not in summary
    first_section = report.split("\n## ", 2)[1]
    assert first_section.startswith("In short")


def test_tokens_sent_per_turn_stay_within_the_budget(report: str) -> None:
    found = tables(report)
    (title,) = [t for t in found if t.startswith("Tokens sent per turn")]
    budget = number(title.split("budget ")[1])
    rows = found[title]
    assert [r["Turns so far"] for r in rows][:3] == ["1", "10", "25"]
    for row in rows:
        assert number(row["Sent tokens"]) <= number(row["Most sent by any turn so far"]) <= budget
        assert number(row["Sent tokens, cut only"]) <= budget
    last = rows[-1]
    assert number(last["Whole history tokens"]) > budget  # long enough to need a summary
    assert number(last["Summarized messages"]) > 0 and number(last["Summary calls"]) > 0


def test_peers_are_measured_beside_ours_or_named_as_left_out(report: str) -> None:
    """With the bench extra installed, the SDK's sessions have rows and ratios; without it,
    the report names the rows it left out and how to get them."""
    section = report.split("\n## Against peers\n", 1)[1].split("\n## ", 1)[0]
    rows = tables(report)["Against peers"]
    workloads = {(r["Stored sessions"], r["History"]) for r in rows}
    assert workloads == {("40", "100"), ("60", "10")}
    expected = [OURS_REDIS, OURS_SQLITE, LIST]
    if not sdk_missing():
        expected += SDK_ROWS
    expected.append(JSON_FILE)
    for workload in workloads:
        found = [r for r in rows if (r["Stored sessions"], r["History"]) == workload]
        assert [r["Candidate"] for r in found] == expected
        for row in found:
            assert number(row["First turns"]) >= 1 and number(row["Steady turns"]) >= 1
            assert number(row["First p50 ms"]) <= number(row["First p99 ms"])
            assert number(row["Steady p50 ms"]) <= number(row["Steady p99 ms"])
            if not row["Candidate"].startswith("ours"):
                assert number(row["First: peer / ours"]) > 0
                assert number(row["Steady: peer / ours"]) > 0
        trips = {r["Candidate"]: r["Round trips first, steady"] for r in found}
        assert number(trips[LIST].split(", ")[1]) == 2  # LRANGE, then MULTI ... EXEC
        assert number(trips[OURS_REDIS].split(", ")[1]) >= 1
    if sdk_missing():
        assert "**Left out:** " + "; ".join(SDK_ROWS) in section
        assert BENCH_EXTRA in section
    else:
        assert "Left out" not in section


def test_the_first_turn_breakdown_puts_ours_beside_the_list(report: str) -> None:
    """The report splits a first turn (the table `python -m benchmarks.breakdown` prints
    alone): every part has a number for our store, and the list's comparable parts theirs."""
    [rows] = [t for title, t in tables(report).items() if title.startswith("A session's first")]
    assert len(rows) == 8
    for row in rows:
        assert not math.isnan(float(row["ours"])), row
    for row in rows[:2] + rows[3:5] + rows[6:]:
        assert not math.isnan(float(row["list"])), row
