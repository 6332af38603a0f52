"""Sharded, the bot runs as several processes on one store, each running some of the shards
(`SHARD_COUNT`, `SHARD_IDS`): Discord sends each guild's events to one shard, and DMs to
shard 0, so every guild is answered by the one process running its shard, DMs by shard 0's,
slash commands are synced once (by shard 0's process), and the start-up catch-up reads only
this process's places. The fake Discord's guild is on shard 1 of 2, its second guild on 0."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.config import Shards, load_settings
from bot.discord_bot.scopes import scope_for, server_for
from bot.errors import SettingsError
from bot.store.base import StorePolicy
from bot.store.redis import RedisStore
from tests.bot_process import ROOT, BotProcess, bot_environment, wait_connected
from tests.conftest import TEST_MODELS, free_port
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord


@pytest.fixture
def fakes() -> Iterator[tuple[FakeDiscord, FakeDedalusAPI]]:
    with FakeDiscord(rate_limit=1000, second_guild=True) as fake, FakeDedalusAPI() as api:
        yield fake, api


@pytest.fixture
def bots() -> Iterator[list[BotProcess]]:
    started: list[BotProcess] = []
    yield started
    for bot in started:
        bot.stop()


def answered(port: int) -> float:
    """The turns this process answered, from its own `/metrics`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dcbot_turns_total" and sample.labels.get("outcome") == "answered"
    )


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            status: int = reply.status
            return status == 200
    except urllib.error.HTTPError:
        return False


def start(
    fake: FakeDiscord,
    api: FakeDedalusAPI,
    redis_url: str,
    log: Path,
    shard_ids: str,
    port: int,
) -> BotProcess:
    env = bot_environment(
        fake,
        api,
        redis_url,
        SHARD_COUNT="2",
        SHARD_IDS=shard_ids,
        HEALTH_PORT=str(port),
        LOG_LEVEL="DEBUG",
    )
    return BotProcess(env, log)


async def test_two_processes_answer_each_guild_and_the_dms_once_by_their_shard(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    redis_url: str,
    bots: list[BotProcess],
    tmp_path: Path,
) -> None:
    fake, api = fakes
    ports = [free_port(), free_port()]
    for shard in (0, 1):
        bots.append(
            start(fake, api, redis_url, tmp_path / f"bot{shard}.log", str(shard), ports[shard])
        )
    wait_connected(bots)
    assert sorted(fake.session_shards, key=str) == [(0, 2), (1, 2)]
    assert "running shard(s) [0] of 2" in bots[0].text()
    assert "running shard(s) [1] of 2" in bots[1].text()
    syncs = [r for r in fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
    assert len(syncs) == 1
    assert [c["name"] for c in fake.commands()] != []

    dm = fake.dm_channel(fake.member)
    fake.user_says(fake.elsewhere_id, fake.member, "on shard 0", mentions_bot=True)
    fake.user_says(fake.general_id, fake.member, "on shard 1", mentions_bot=True)
    dm_message = fake.user_says(dm, fake.member, "a DM")

    def counted() -> list[float] | None:
        found = [answered(port) for port in ports]
        return found if sum(found) == 3 else None

    per_process = await fake.wait_for(counted, 120, what="three answers")
    assert per_process == [2.0, 1.0]  # the second guild and the DM on shard 0; the guild on 1
    for channel, said in (
        (fake.elsewhere_id, "on shard 0"),
        (fake.general_id, "on shard 1"),
        (dm, "a DM"),
    ):
        [answer] = fake.bot_messages(channel)
        assert answer.content.endswith(said)  # the fake model echoes
    on_one = [d["id"] for e, d in fake.delivered((1, 2)) if e == "MESSAGE_CREATE"]
    assert str(dm_message) not in on_one

    logged = "".join(bot.text() for bot in bots)
    assert "answered elsewhere" not in logged  # no process even saw another's messages
    assert "Traceback" not in logged and not re.search(r"\bERROR\b", logged), logged


async def test_catch_up_reads_only_the_places_of_this_process_shards(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    redis_url: str,
    bots: list[BotProcess],
    tmp_path: Path,
) -> None:
    """Messages wait in a channel of each guild and in a DM, all places answered in before;
    the process running shard 1 answers only its guild's; shard 0's then answers the rest."""
    fake, api = fakes
    dm = fake.dm_channel(fake.member)
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
    try:
        for channel in (fake.general_id, fake.elsewhere_id, dm):
            await store.note_place(scope_for(channel))
    finally:
        await store.close()
    fake.user_says(fake.elsewhere_id, fake.member, "missed on shard 0", mentions_bot=True)
    fake.user_says(fake.general_id, fake.member, "missed on shard 1", mentions_bot=True)
    fake.user_says(dm, fake.member, "a missed DM")

    ports = [free_port(), free_port()]
    second = start(fake, api, redis_url, tmp_path / "bot1.log", "1", ports[1])
    bots.append(second)
    wait_connected([second])
    await fake.wait_bot_messages(fake.general_id, 1, timeout=120)
    for scope in (scope_for(fake.elsewhere_id), scope_for(dm)):
        skipped = f"{scope} is on another process's shard"
        await fake.wait_for(lambda s=skipped: s in second.text(), 60, what=skipped)  # type: ignore[misc]
    assert fake.bot_messages(fake.elsewhere_id) == [] and fake.bot_messages(dm) == []

    first = start(fake, api, redis_url, tmp_path / "bot0.log", "0", ports[0])
    bots.append(first)
    wait_connected([first])
    await fake.wait_bot_messages(fake.elsewhere_id, 1, timeout=120)
    await fake.wait_bot_messages(dm, 1, timeout=120)
    per_process = await fake.wait_for(
        lambda: (found := [answered(p) for p in ports]) == [2.0, 1.0] and found,
        60,
        what="two answers by shard 0's process, one by shard 1's",
    )
    assert per_process == [2.0, 1.0]


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"SHARD_IDS": "0"}, "SHARD_IDS needs SHARD_COUNT, the total number of shards"),
        ({"SHARD_COUNT": "auto", "SHARD_IDS": "0"}, "SHARD_IDS needs a number in SHARD_COUNT"),
        ({"SHARD_COUNT": "0"}, "SHARD_COUNT must be a positive whole number or auto"),
        ({"SHARD_COUNT": "two"}, "SHARD_COUNT must be a positive whole number or auto"),
        (
            {"SHARD_COUNT": "2", "SHARD_IDS": "1-2"},
            "SHARD_IDS names shard 2, but SHARD_COUNT=2 has shards 0 to 1",
        ),
        ({"SHARD_COUNT": "4", "SHARD_IDS": "3-1"}, "SHARD_IDS must be shard ids like 0-3 or 0,2"),
        ({"SHARD_COUNT": "4", "SHARD_IDS": "0,,2"}, "SHARD_IDS must be shard ids like 0-3 or 0,2"),
        ({"SHARD_COUNT": "4", "SHARD_IDS": "-1"}, "SHARD_IDS must be shard ids like 0-3 or 0,2"),
    ],
)
def test_bad_shard_settings_stop_with_one_line_naming_them(env: dict[str, str], said: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", **env})
    assert str(raised.value).startswith(said)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("env", "shards"),
    [
        ({}, None),
        ({"SHARD_COUNT": "auto"}, Shards(None, None)),
        ({"SHARD_COUNT": "4"}, Shards(4, None)),
        ({"SHARD_COUNT": "8", "SHARD_IDS": "4-5, 7,0"}, Shards(8, (0, 4, 5, 7))),
    ],
)
def test_shard_settings_name_the_shards_this_process_runs(
    env: dict[str, str], shards: Shards | None
) -> None:
    assert load_settings(env).shards == shards


def test_a_bad_shard_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {"DISCORD_TOKEN": "t", "DEDALUS_API_KEY": "k", "SHARD_COUNT": "2", "SHARD_IDS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: SHARD_IDS names shard 2, but SHARD_COUNT=2 has shards 0 to 1"
    )


async def test_shard_count_auto_runs_discords_recommended_shards_in_one_process(
    redis_url: str, bots: list[BotProcess], tmp_path: Path
) -> None:
    with (
        FakeDiscord(rate_limit=1000, second_guild=True, recommended_shards=2) as fake,
        FakeDedalusAPI() as api,
    ):
        port = free_port()
        env = bot_environment(fake, api, redis_url, SHARD_COUNT="auto", HEALTH_PORT=str(port))
        bots.append(BotProcess(env, tmp_path / "bot.log"))
        wait_connected(bots)
        assert sorted(fake.session_shards, key=str) == [(0, 2), (1, 2)]
        assert "running shard(s) [0, 1] of 2" in bots[0].text()
        await fake.wait_for(lambda: healthy(port), 30, what="/healthz 200 with both shards up")
        dm = fake.dm_channel(fake.member)
        fake.user_says(fake.elsewhere_id, fake.member, "one", mentions_bot=True)
        fake.user_says(fake.general_id, fake.member, "two", mentions_bot=True)
        fake.user_says(dm, fake.member, "three")
        for channel in (fake.elsewhere_id, fake.general_id, dm):
            await fake.wait_bot_messages(channel, 1, timeout=120)
        syncs = [r for r in fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
        assert len(syncs) == 1


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_healthz_is_503_naming_a_shard_whose_gateway_dropped_until_it_reconnects(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    redis_url: str,
    bots: list[BotProcess],
    tmp_path: Path,
) -> None:
    """One process running both shards; Discord's gateway drops shard 1 (the fake's guild)
    and refuses to let it back in for a while: the process is not healthy meanwhile, and
    says which shard is down, though shard 0 and the store are fine."""
    fake, api = fakes
    port = free_port()
    bots.append(start(fake, api, redis_url, tmp_path / "bot.log", "0-1", port))
    wait_connected(bots)
    await fake.wait_for(lambda: health(port)[0] == 200, 30, what="/healthz 200 at first")

    may_reconnect = threading.Event()
    fake.drop_shard((1, 2), may_reconnect)
    try:
        await fake.wait_for(lambda: health(port)[0] == 503, 30, what="/healthz 503")
        # Still down once its reconnect was refused: it cannot have come back.
        await fake.wait_for(lambda: fake.refused_connections >= 1, 60, what="a refused reconnect")
        status, body = health(port)
        assert status == 503
        assert body == "discord: gateway shard(s) 1 disconnected; reconnecting\n"
    finally:
        may_reconnect.set()
    await fake.wait_for(lambda: health(port) == (200, "ok\n"), 120, what="/healthz 200 again")
    fake.user_says(fake.general_id, fake.member, "after the outage", mentions_bot=True)
    [answer] = await fake.wait_bot_messages(fake.general_id, 1, timeout=120)
    assert answer.content.endswith("after the outage")


async def test_catch_up_looks_only_at_the_places_of_this_process_shards(
    fakes: tuple[FakeDiscord, FakeDedalusAPI],
    redis_url: str,
    bots: list[BotProcess],
    tmp_path: Path,
) -> None:
    """Places are kept with their server, so a process starting on shard 1 does not even
    look up shard 0's places (a REST call each, for channels it does not have); a place
    noted before servers were kept is still read, and kept with its server once answered."""
    fake, api = fakes
    dm = fake.dm_channel(fake.member)
    store = RedisStore.from_url(redis_url, StorePolicy(TEST_MODELS[0]))
    try:
        await store.note_place(scope_for(fake.general_id))  # as before servers were kept
        await store.note_place(scope_for(fake.elsewhere_id), server_for(fake.other_guild_id, 1))
        await store.note_place(scope_for(dm), server_for(None, fake.member_id))
        fake.user_says(fake.elsewhere_id, fake.member, "missed on shard 0", mentions_bot=True)
        fake.user_says(fake.general_id, fake.member, "missed on shard 1", mentions_bot=True)
        fake.user_says(dm, fake.member, "a missed DM")

        ports = [free_port(), free_port()]
        second = start(fake, api, redis_url, tmp_path / "bot1.log", "1", ports[1])
        bots.append(second)
        wait_connected([second])
        await fake.wait_bot_messages(fake.general_id, 1, timeout=120)
        assert "reading 1 place(s) for messages missed while stopped" in second.text()
        looked_up = [
            r.path for r in fake.requests if f"/channels/{fake.elsewhere_id}" in r.path
        ] + [r.path for r in fake.requests if f"/channels/{dm}" in r.path]
        assert looked_up == []
        places = {place.scope: place.server for place in await store.recent_places()}
        assert places[scope_for(fake.general_id)] == server_for(fake.guild_id, 0)

        first = start(fake, api, redis_url, tmp_path / "bot0.log", "0", ports[0])
        bots.append(first)
        wait_connected([first])
        await fake.wait_bot_messages(fake.elsewhere_id, 1, timeout=120)
        await fake.wait_bot_messages(dm, 1, timeout=120)
        assert "reading 2 place(s) for messages missed while stopped" in first.text()
        assert "another process's shard" not in first.text() + second.text()
    finally:
        await store.close()
