"""Overlapping messages, two bot processes, duplicate and replayed events: every message is
answered exactly once and the history holds each question followed by its own answer, in
the order the messages were sent."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.discord_bot.scopes import scope_for
from bot.store.base import SessionStore, StorePolicy
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore
from tests.bot_process import bot_environment
from tests.conftest import TEST_MODELS, RedisServer
from tests.discord_harness import Harness
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

ROOT = Path(__file__).resolve().parents[1]


def echo_of(question: dict[str, object]) -> dict[str, object]:
    return {"role": "assistant", "content": f"echo: {question['content']}"}


@pytest.fixture
def fakes() -> Iterator[tuple[FakeDiscord, FakeDedalusAPI]]:
    with FakeDiscord(rate_limit=1000) as discord_fake, FakeDedalusAPI() as api:
        yield discord_fake, api


@pytest.fixture(params=["redis", "redis-cluster", "sqlite"])
async def shared_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SessionStore]:
    """The store two bot processes share (one Redis, a Redis Cluster, or one SQLite file),
    for reading it; `request.param` tells the processes which."""
    store: SessionStore
    if request.param == "redis":
        store = RedisStore.from_url(
            request.getfixturevalue("redis_url"), StorePolicy(TEST_MODELS[0])
        )
    elif request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster_url")
        store = RedisStore.from_url(url, StorePolicy(TEST_MODELS[0]), cluster=True)
    else:
        store = SqliteStore(tmp_path / "shared.sqlite3", StorePolicy(TEST_MODELS[0]))
    yield store
    await store.close()


@pytest.fixture
def two_bot_processes(
    request: pytest.FixtureRequest,
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    shared_store: SessionStore,
    tmp_path: Path,
) -> Iterator[list[Path]]:
    fake, api = fakes
    # No start-up catch-up: a process slow to start would read the test's own messages as
    # missed and log giving each up a second time, which the count below does not expect.
    settings = {"MODEL_MAX_RETRIES": "0", "LOG_LEVEL": "DEBUG", "BACKFILL_MAX_AGE_SECONDS": "0"}
    backend = request.node.callspec.params["shared_store"]
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        env = bot_environment(fake, api, url, **settings)
    elif backend == "redis-cluster":
        url = request.getfixturevalue("redis_cluster_url")
        env = bot_environment(fake, api, url, REDIS_CLUSTER="true", **settings)
    else:
        sqlite_path = str(tmp_path / "shared.sqlite3")
        env = bot_environment(fake, api, None, SQLITE_PATH=sqlite_path, **settings)
    logs = [tmp_path / f"bot{i}.log" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.bot_process"],
            cwd=ROOT,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    try:
        deadline = time.monotonic() + 30
        while not all("connected as" in log.read_text() for log in logs):
            running = all(p.poll() is None for p in processes)
            assert running and time.monotonic() < deadline, [log.read_text() for log in logs]
            time.sleep(0.05)
        yield logs
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


@pytest.mark.timeout(420)
async def test_fifty_overlapping_messages_across_two_processes(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    two_bot_processes: list[Path],
    shared_store: SessionStore,
) -> None:
    fake, api = fakes
    for i in range(50):
        fake.user_says(fake.general_id, fake.member, f"m{i:02}", mentions_bot=True)

    def left_to_the_other_process() -> int:
        """Messages a process gave up. Distinct ids: the start-up catch-up of a process that
        connected late may read a message the other one answered, and give it up again."""
        return sum(
            len(set(re.findall(r"message (\d+) is answered elsewhere", log.read_text())))
            for log in two_bot_processes
        )

    def all_decided() -> bool:
        """Every message answered by one process and given up by the other: both have
        decided on each (a process takes a channel's messages one after another), so no
        duplicate can come later. More than 50 answers ends the wait at once."""
        answered = len(fake.bot_messages(fake.general_id))
        return answered > 50 or (answered == 50 and left_to_the_other_process() == 50)

    # Generous: on a loaded 2-core machine 100 decisions took over 90 s.
    await fake.wait_for(all_decided, timeout=300, what="50 answers, each also given up once")
    answers = fake.bot_messages(fake.general_id)
    assert len(answers) == 50
    history = await shared_store.read_history(scope_for(fake.general_id), "default")
    assert len(history) == 100
    questions = history[0::2]
    assert [q["content"].rsplit(": ", 1)[1] for q in questions] == [f"m{i:02}" for i in range(50)]
    assert history[1::2] == [echo_of(q) for q in questions]
    assert api.request_count == 50
    # Both processes saw every message; only the one answering showed the bot typing.
    assert fake.typing_calls.count(fake.general_id) == 50
    logs = "".join(log.read_text() for log in two_bot_processes)
    assert "Traceback" not in logs


async def test_a_duplicated_event_is_answered_once(harness: Harness) -> None:
    fake = harness.discord
    said = fake.user_says(fake.general_id, fake.member, "only once", mentions_bot=True)
    event = next(d for e, d in fake.dispatched if e == "MESSAGE_CREATE" and d["id"] == str(said))
    fake.dispatch("MESSAGE_CREATE", event)
    fake.dispatch("MESSAGE_CREATE", event)
    # The bot takes a channel's messages in order: once it has answered a later one, it
    # has decided on every copy.
    fake.user_says(fake.general_id, fake.member, "and then this", mentions_bot=True)
    answers = await harness.answer(fake.general_id, 2)
    assert len(answers) == 2
    assert "only once" in answers[0].content and "and then this" in answers[1].content
    assert harness.api.request_count == 2


async def test_events_replayed_after_a_resume_are_answered_once(harness: Harness) -> None:
    fake = harness.discord
    fake.request_reconnect()
    for text in ("during", "the", "reconnect"):
        fake.user_says(fake.general_id, fake.member, text, mentions_bot=True)
    await harness.answer(fake.general_id, 3)
    await fake.wait_for(lambda: fake.resumes >= 1, what="the client to resume")
    # Replayed events come before any new one, and the bot takes a channel's messages in
    # order: once it has answered a new message, it has decided on every replayed one.
    fake.user_says(fake.general_id, fake.member, "after the resume", mentions_bot=True)
    answers = await harness.answer(fake.general_id, 4)
    assert len(answers) == 4 and "after the resume" in answers[3].content
    assert len(await harness.history(fake.general_id)) == 8


async def test_different_channels_do_not_wait_for_each_other(harness: Harness) -> None:
    fake, api = harness.discord, harness.api
    slow_may_answer = threading.Event()
    api.reply_text("slow answer", hold=slow_may_answer)
    fake.user_says(fake.general_id, fake.member, "slow one", mentions_bot=True)
    await fake.wait_for(lambda: api.request_count == 1, what="the slow request")
    fake.user_says(fake.random_id, fake.member, "quick one", mentions_bot=True)
    try:  # answered while the other channel's model call is held: it waited for nothing
        await fake.wait_for(lambda: harness.answers(fake.random_id), 30, what="the quick answer")
    finally:
        slow_may_answer.set()
    [slow] = await harness.answer(fake.general_id, timeout=30)
    assert slow.content == "slow answer"


@pytest.mark.parametrize("backend", ["redis", "redis-cluster"])
async def test_three_hundred_channels_at_once_are_all_answered(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """More turns in flight than the Redis pool has connections: they wait, none fails.
    On a cluster too, whose client would refuse them at once. (The wait counts in a call's
    5 s deadline, which a loaded machine can use up here: what this shows is the waiting,
    so the deadline is a minute.)"""
    from bot.engine import Engine, EngineLimits
    from bot.model import DedalusModel

    cluster = backend == "redis-cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    with FakeDedalusAPI() as api:
        policy = StorePolicy(TEST_MODELS[0])
        store = RedisStore.from_url(url, policy, call_timeout=60, cluster=cluster)
        model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 10_000))
        scopes = [f"load:{i}" for i in range(300)]
        replies = await asyncio.gather(
            *(engine.reply(s, {"role": "user", "content": s}) for s in scopes)
        )
        assert [r.text for r in replies] == [f"echo: {s}" for s in scopes]
        histories = await asyncio.gather(*(store.read_history(s, "default") for s in scopes))
        assert all(len(h) == 2 for h in histories)
        await store.close()


async def test_an_answer_survives_a_storage_blip_while_the_model_works(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from bot.engine import Engine, EngineLimits
    from bot.model import DedalusModel

    with FakeDedalusAPI() as api:
        store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
        model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 10_000))
        model_may_answer = threading.Event()
        api.reply_text("worth keeping", hold=model_may_answer)
        turn = asyncio.create_task(engine.reply("blip", {"role": "user", "content": "q"}))
        while api.request_count == 0:  # noqa: ASYNC110 - the fake runs in another thread
            await asyncio.sleep(0.01)
        redis_server.stop()
        model_may_answer.set()  # the model answers while storage is down...
        deadline = time.monotonic() + 30
        while not any("saving a turn failed" in r.getMessage() for r in caplog.records):
            assert not turn.done() and time.monotonic() < deadline  # ...and a save fails
            await asyncio.sleep(0.01)
        redis_server.start()  # within the retries' 1.7 s
        reply = await turn
        assert reply.text == "worth keeping"
        history = await store.read_history("blip", "default")
        assert history == [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "worth keeping"},
        ]
        await store.close()


async def test_a_redis_that_stops_answering_fails_the_call_in_time(
    redis_url: str, redis_server: RedisServer
) -> None:
    """A frozen Redis (paused, overloaded, a network that drops packets) fails the call as
    storage unavailable at its deadline instead of hanging the turn; once Redis answers
    again, the next call gets its own reply, not the stale one of the call that gave up."""
    import signal

    from bot.errors import StoreUnavailable

    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]), call_timeout=0.5)
    await store.set_scope_option("frozen", "mode", "all")
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.scope_option("frozen", "mode")
        assert time.monotonic() - started < 4  # its 0.5 s deadline, not the 5 s default
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await store.set_scope_option("frozen", "other", "value")
    assert await store.scope_option("frozen", "mode") == "all"
    assert await store.scope_option("frozen", "other") == "value"
    await store.close()
