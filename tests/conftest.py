"""Shared fixtures: a throwaway real Redis server, and a store of each backend over it."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
import redis.asyncio as aioredis

from bot.store.base import SessionStore, StorePolicy
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.redis_cluster import RedisClusterNodes, until_answers

if TYPE_CHECKING:
    from tests.discord_harness import Harness

TEST_MODELS = (
    "openai/gpt-5.1",
    "anthropic/claude-opus-4-5-20251101",
    "google/gemini-3-pro-preview",
)


def _ephemeral_ports() -> range:
    """The ports the kernel hands out to outgoing connections (and to `bind(port 0)`)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and outside the ephemeral range: a port the kernel picked (port 0)
    may be taken by any outgoing connection (a test's client, the bot's own) before the
    server a test starts on it binds it, which failed a test now and then with "address
    already in use". Below that range only servers bind, and each port is handed out once."""
    ephemeral = _ephemeral_ports()
    low = 10_000 if ephemeral.start > 12_000 else 1_024
    high = ephemeral.start if ephemeral.start > low + 1_000 else 65_536
    candidates = random.Random().sample(range(low, high), 200)
    for port in candidates:
        if port in _handed_out or port in ephemeral:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


class RedisServer:
    """A real redis-server on a free port that a test may stop and start again."""

    def __init__(
        self, directory: Path, password: str | None = None, options: Sequence[str] = ()
    ) -> None:
        """`options`: more of redis-server's command-line settings."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; .ci/run installs it")
        self.binary = binary
        self.port = free_port()
        self.directory = directory
        self.password = password
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *(["--requirepass", self.password] if self.password else []),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
        )
        until_answers(self.port, self.password)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def admin(self, db: int = 0) -> redis.Redis:
        """A plain client of the test's own, to look at or poke the server."""
        return redis.Redis(port=self.port, password=self.password, db=db)

    def clients(self) -> int:
        """Client connections on the server, the one asking not counted."""
        with self.admin() as client:
            return int(client.info("clients")["connected_clients"]) - 1


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterNodes) -> str:
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own: its clients are the test's alone, and it may be stopped
    or frozen (it is thawed before it is stopped)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.process is None:
        redis_server.start()
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def policy() -> StorePolicy:
    return StorePolicy(default_model=TEST_MODELS[0], ttl_seconds=0, history_cap=1000)


@pytest.fixture(params=["redis", "redis-cluster", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, policy: StorePolicy
) -> AsyncIterator[SessionStore]:
    """Each contract test runs once per backend: Redis, Redis Cluster and SQLite."""
    backend: SessionStore
    if request.param == "redis":
        backend = RedisStore.from_url(request.getfixturevalue("redis_url"), policy)
    elif request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster_url")
        backend = RedisStore.from_url(url, policy, cluster=True)
    else:
        backend = SqliteStore(tmp_path / "sessions.sqlite3", policy)
    yield backend
    await backend.close()


@pytest.fixture
async def raw_redis_store(redis_url: str, policy: StorePolicy) -> AsyncIterator[RedisStore]:
    """The Redis store alone, for faults only Redis can have (a key of the wrong type)."""
    backend = RedisStore.from_url(redis_url, policy)
    yield backend
    await backend.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def api() -> Iterator[FakeDedalusAPI]:
    with FakeDedalusAPI() as fake:
        yield fake


@pytest.fixture(params=["redis", "sqlite"])
def console_env(
    request: pytest.FixtureRequest, api: FakeDedalusAPI, redis_url: str, tmp_path: Path
) -> dict[str, str]:
    """The environment of a `python -m bot` process on each store, talking to `api`."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **api.env()}
    env["SQLITE_PATH"] = str(tmp_path / "console.sqlite3")
    env["MODEL_MAX_RETRIES"] = "0"
    if request.param == "redis":
        env["REDIS_URL"] = redis_url
    return env


@pytest.fixture
async def harness(redis_url: str) -> AsyncIterator[Harness]:
    """The bot, connected to the fake Discord and the fake Dedalus API, over real Redis."""
    from tests.discord_harness import Harness
    from tests.fakes.dedalus_api import FakeDedalusAPI
    from tests.fakes.discord_gateway import FakeDiscord

    with (
        FakeDiscord() as discord_fake,
        discord_fake.point_discord_py_here(),
        FakeDedalusAPI() as api,
    ):
        running = Harness(discord_fake, api, redis_url)
        await running.start()
        try:
            yield running
        finally:
            await running.stop()
