"""The operator's listener (`HEALTH_PORT`), on real bot processes: `/healthz` is 503 with the
reason while Redis is stopped and 200 again when it answers; `/metrics` parses with
prometheus_client's own parser, and its counts, summed over two processes sharing one
token, are the turns and commands people made, with no content, name or secret in it."""

from __future__ import annotations

import asyncio
import functools
import random
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bot.metrics import SECONDS_BUCKETS, Metrics, TurnPart
from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.conftest import RedisServer, free_port
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

QUESTION = "what about the thing 5b2e"


@pytest.fixture
def fakes() -> Iterator[tuple[FakeDiscord, FakeDedalusAPI]]:
    with FakeDiscord(rate_limit=1000) as discord_fake, FakeDedalusAPI() as api:
        yield discord_fake, api


@pytest.fixture
def bots() -> Iterator[list[BotProcess]]:
    started: list[BotProcess] = []
    yield started
    for bot in started:
        bot.stop()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def until(port: int, path: str, status: int, what: str) -> str:
    for _ in range(600):
        got, body = await asyncio.to_thread(get, port, path)
        if got == status:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: still {got} {body!r}")


async def test_healthz_is_503_naming_the_store_while_redis_is_stopped_and_200_after(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    redis_url: str,
    redis_server: RedisServer,
    bots: list[BotProcess],
    tmp_path: Path,
) -> None:
    fake, api = fakes
    port = free_port()
    env = bot_environment(fake, api, redis_url, HEALTH_PORT=str(port))
    bots.append(BotProcess(env, tmp_path / "bot.log"))
    wait_connected(bots)
    assert await until(port, "/healthz", 200, "healthy once connected") == "ok\n"

    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        body = await until(port, "/healthz", 503, "unhealthy while Redis is stopped")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert body.startswith("store: ") and "discord" not in body
    assert "redis://" not in body
    await until(port, "/healthz", 200, "healthy again once Redis answers")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def summed(scrapes: list[str], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return sum(samples(text).get(key, 0.0) for text in scrapes)


async def test_metrics_summed_over_two_processes_count_what_people_did(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    redis_url: str,
    bots: list[BotProcess],
    tmp_path: Path,
) -> None:
    fake, api = fakes
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        # No start-up catch-up: a process slow to start would read the messages below as
        # missed and count giving one up twice.
        env = bot_environment(
            fake,
            api,
            redis_url,
            HEALTH_PORT=str(port),
            MODEL_MAX_RETRIES="0",
            BACKFILL_MAX_AGE_SECONDS="0",
        )
        bots.append(BotProcess(env, tmp_path / f"bot{i}.log"))
    wait_connected(bots)

    def answers(count: int) -> bool | None:
        return len(fake.bot_messages(fake.general_id)) == count or None

    for i in range(3):
        api.reply_text(f"answer {i}")
        fake.user_says(fake.general_id, fake.member, f"{QUESTION} {i}", mentions_bot=True)
        await fake.wait_for(functools.partial(answers, i + 1), what="an answer")
    api.reply_error(503)
    fake.user_says(fake.general_id, fake.member, QUESTION, mentions_bot=True)
    await fake.wait_for(lambda: answers(4), what="the failure reply")
    status = fake.invoke("status", user=fake.member, channel_id=fake.general_id)
    await fake.wait_interaction_reply(status, timeout=30)

    def scrape() -> list[str]:
        return [get(port, "/metrics")[1] for port in ports]

    async def settled() -> list[str]:
        """Until both processes counted all four messages (the one that did not answer a
        message counts it once its claim tells it so)."""
        for _ in range(600):
            scrapes = await asyncio.to_thread(scrape)
            if summed(scrapes, "dcbot_turns_total", outcome="answered_elsewhere") == 4:
                return scrapes
            await asyncio.sleep(0.1)
        raise AssertionError(scrapes)

    scrapes = await settled()
    assert summed(scrapes, "dcbot_turns_total", outcome="answered") == 3
    assert summed(scrapes, "dcbot_turns_total", outcome="model_error") == 1
    assert summed(scrapes, "dcbot_model_errors_total", kind="unavailable") == 1
    assert summed(scrapes, "dcbot_interactions_total", command="status") == 1
    assert summed(scrapes, "dcbot_turn_seconds_count", part="model") == 4
    assert summed(scrapes, "dcbot_turn_seconds_count", part="discord") == 3
    assert summed(scrapes, "dcbot_turn_seconds_count", part="total") == 8
    assert summed(scrapes, "dcbot_places_active") == 1  # the process that answered
    assert summed(scrapes, "dcbot_store_errors_total") == 0
    assert summed(scrapes, "dcbot_gateway_latency_seconds", shard="0") > 0
    for text in scrapes:
        for private in (QUESTION, "Bob", str(fake.member_id), str(fake.general_id), fake.token):
            assert private not in text


def test_turn_times_are_exported_as_a_prometheus_histogram_would_export_them() -> None:
    """A dashboard built on `dcbot_turn_seconds` (buckets, count, sum, created) reads the
    same series as from prometheus_client's own Histogram fed the same times."""
    with mock.patch("time.time", lambda: 1_764_670_000.5):
        metrics, registry = Metrics(), CollectorRegistry()
        reference = Histogram(
            "dcbot_turn_seconds",
            "Time of a turn and of its parts.",
            ["part"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        rng = random.Random(3)
        for _ in range(2_000):
            part = rng.choice([TurnPart.MODEL, TurnPart.TOTAL, TurnPart.QUEUE])
            seconds = rng.choice([0.0, 0.001, 2.5, 60.0, 75.0, rng.random() * 3])
            metrics.part_took(part, seconds)
            reference.labels(part.value).observe(seconds)

    def histogram(text: bytes) -> str:
        lines = text.decode().splitlines(keepends=True)
        return "".join(line for line in lines if "dcbot_turn_seconds" in line)

    exported = histogram(generate_latest(metrics.registry))
    assert 'dcbot_turn_seconds_bucket{le="+Inf",part="model"}' in exported
    assert exported == histogram(generate_latest(registry))
