"""A bot process frozen mid-turn (SIGSTOP, as a long GC pause would) past its turn's lease
must not save stale work when it wakes: another process answered meanwhile, or someone ran
/clear. The other process took its message over, so it shows no second answer either. Real
processes, real signals, one Redis; the fake model is slowed so the freeze lands while the
turn waits for its answer. A live turn during a /clear is not kept either."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import redis

from bot.discord_bot.scopes import scope_for
from bot.engine import NOT_KEPT_NOTE
from bot.store.redis import session_key
from tests.bot_process import bot_environment
from tests.discord_harness import Harness
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

ROOT = Path(__file__).resolve().parents[1]
SEND_AGAIN = "send your message again"


class BotProcesses:
    """`python -m tests.bot_process` processes against the same fakes and Redis."""

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.env = env
        self.directory = directory
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = self.directory / f"bot{len(self.running)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.bot_process"],
            cwd=ROOT,
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.running.append((process, log))
        deadline = time.monotonic() + 60
        while "connected as" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        return process

    def stop_all(self) -> None:
        for process, _ in self.running:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(30)


@pytest.fixture
def fakes() -> Iterator[tuple[FakeDiscord, FakeDedalusAPI]]:
    with FakeDiscord(rate_limit=1000) as discord_fake, FakeDedalusAPI() as api:
        yield discord_fake, api


class SharedStore:
    """What the processes share (one Redis, or one SQLite file), read directly by the test."""

    def __init__(self, backend: str, redis_url: str, directory: Path) -> None:
        self.backend = backend
        self.redis_url = redis_url
        self.path = directory / "shared.sqlite3"
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)

    def env(self, fake: FakeDiscord, api: FakeDedalusAPI) -> dict[str, str]:
        settings = {"MODEL_MAX_RETRIES": "0", "TURN_LEASE_SECONDS": "1"}
        if self.backend == "redis":
            return bot_environment(fake, api, self.redis_url, **settings)
        return bot_environment(fake, api, None, SQLITE_PATH=str(self.path), **settings)

    def lock_held(self, scope: str) -> bool:
        if self.backend == "redis":
            return bool(self.redis.exists(session_key(scope, "default", "lock")))
        with closing(sqlite3.connect(self.path)) as db:
            row = db.execute(
                "SELECT lock_expires FROM sessions WHERE scope = ? AND name = 'default'", (scope,)
            ).fetchone()
        return row is not None and row[0] > time.time()

    def stored(self, scope: str) -> list[str]:
        if self.backend == "redis":
            return [
                str(m) for m in self.redis.lrange(session_key(scope, "default", "messages"), 0, -1)
            ]
        with closing(sqlite3.connect(self.path)) as db:
            rows = db.execute(
                "SELECT body FROM messages WHERE scope = ? AND name = 'default' ORDER BY id",
                (scope,),
            ).fetchall()
        return [str(row[0]) for row in rows]


@pytest.fixture(params=["redis", "sqlite"])
def shared(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[SharedStore]:
    store = SharedStore(request.param, redis_url, tmp_path)
    yield store
    store.redis.close()


@pytest.fixture
def bots(
    fakes: tuple[FakeDiscord, FakeDedalusAPI], shared: SharedStore, tmp_path: Path
) -> Iterator[BotProcesses]:
    processes = BotProcesses(shared.env(*fakes), tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.mark.parametrize("meanwhile", ["another-turn", "clear"])
async def test_a_turn_frozen_past_its_lease_saves_nothing_stale(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    bots: BotProcesses,
    shared: SharedStore,
    meanwhile: str,
) -> None:
    fake, api = fakes
    scope = scope_for(fake.general_id)
    first = bots.start()
    fake.user_says(fake.general_id, fake.member, "before", mentions_bot=True)
    await fake.wait_bot_messages(fake.general_id, 1, timeout=60)

    frozen = threading.Event()
    api.reply_text("the stale answer", hold=frozen)
    fake.user_says(fake.general_id, fake.member, "old question", mentions_bot=True)
    await fake.wait_for(lambda: api.request_count >= 2, timeout=60, what="the slow model call")
    first.send_signal(signal.SIGSTOP)  # frozen while the model answers
    frozen.set()
    bots.start()
    # The frozen process's claim on the message lapses with its lease: the new process
    # takes the message over (at start-up, catching up on what was missed) and answers it.
    await fake.wait_for(
        lambda: any("echo:" in m.content for m in fake.bot_messages(fake.general_id)[1:]),
        timeout=60,
        what="the other process to answer the frozen one's message",
    )
    if meanwhile == "another-turn":
        fake.user_says(fake.general_id, fake.member, "newer question", mentions_bot=True)
        await fake.wait_for(
            lambda: any("newer question" in m.content for m in fake.bot_messages(fake.general_id)),
            timeout=60,
            what="the other process's answer",
        )
    await fake.wait_for(
        lambda: not shared.lock_held(scope), timeout=60, what="the frozen turn's lease to lapse"
    )
    if meanwhile == "clear":
        interaction = fake.invoke("clear", user=fake.admin, channel_id=fake.general_id)
        assert (await fake.wait_interaction_reply(interaction, timeout=60)).text.startswith(
            "Cleared session"
        )
    stored_before_waking = shared.stored(scope)
    first.send_signal(signal.SIGCONT)

    # The message was answered by the other process: the frozen turn stops, says nothing
    # (no second answer, no "send again") and removes anything it had begun to post.
    frozen_log = bots.running[0][1]
    await fake.wait_for(
        lambda: "taken over by another process" in frozen_log.read_text(),
        timeout=60,
        what="the frozen turn to learn its message was taken over",
    )
    shown = [m.content for m in fake.bot_messages(fake.general_id)]
    assert not any(SEND_AGAIN in text or "stale answer" in text for text in shown), shown
    assert "Traceback" not in frozen_log.read_text()
    stored = shared.stored(scope)
    assert stored == stored_before_waking
    assert not any("stale answer" in item for item in stored)
    asked = [item for item in stored if '"role":"user"' in item and "old question" in item]
    assert len(asked) <= 1  # the other process's turn, unless /clear forgot it


async def test_an_answer_written_during_a_clear_is_shown_but_not_kept(harness: Harness) -> None:
    """/clear means "forget everything said until now": a turn that began before it is
    answered, not stored, and its reply says so."""
    fake, api = harness.discord, harness.api
    cleared_first = threading.Event()
    api.reply_text("an answer from before the clear", hold=cleared_first)
    fake.user_says(fake.general_id, fake.member, "asked before the clear", mentions_bot=True)
    await fake.wait_for(lambda: api.request_count >= 1, timeout=60, what="the model call")
    cleared = await harness.command("clear", user=fake.admin, channel_id=fake.general_id)
    cleared_first.set()
    assert cleared == "Cleared session: default"
    answer = (await harness.answer(fake.general_id, timeout=60))[-1].content
    assert answer.startswith("an answer from before the clear")
    assert NOT_KEPT_NOTE in answer
    assert await harness.history(fake.general_id) == []
