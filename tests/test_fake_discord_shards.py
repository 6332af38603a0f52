"""The fake Discord speaks shards as Discord does, so a sharded bot can be tested on it:
each gateway session gets only its shard's guilds and their events, DMs only on shard 0,
a bad `shard` is refused with 4010, and `/gateway/bot` recommends a shard count.

The clients here are the real discord.py `AutoShardedClient`, unmodified.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import aiohttp
import discord
import pytest

from tests.fakes.discord_gateway import FakeDiscord


class ShardedClient(discord.AutoShardedClient):
    """Remembers which messages reached it, to tell the shards' processes apart."""

    def __init__(self, **options: object) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(intents=intents, guild_ready_timeout=0.1, **options)  # type: ignore[arg-type]
        self.seen: list[int] = []
        self.ready = asyncio.Event()

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append(message.id)


@pytest.fixture
def fake() -> Iterator[FakeDiscord]:
    with (
        FakeDiscord(second_guild=True, recommended_shards=3) as fake,
        fake.point_discord_py_here(),
    ):
        yield fake


async def _running(fake: FakeDiscord, client: ShardedClient) -> asyncio.Task[None]:
    running = asyncio.create_task(client.start(fake.token))
    await asyncio.wait_for(client.ready.wait(), 30)
    return running


@pytest.fixture
async def shards(fake: FakeDiscord) -> AsyncIterator[tuple[ShardedClient, ShardedClient]]:
    """Two processes' clients: shard 0 of 2 and shard 1 of 2."""
    first = ShardedClient(shard_count=2, shard_ids=[0])
    second = ShardedClient(shard_count=2, shard_ids=[1])
    tasks = [await _running(fake, first), await _running(fake, second)]
    try:
        yield first, second
    finally:
        for client in (first, second):
            await client.close()
        await asyncio.gather(*tasks)


async def test_each_shard_gets_only_its_guilds(
    fake: FakeDiscord, shards: tuple[ShardedClient, ShardedClient]
) -> None:
    first, second = shards
    assert sorted(fake.session_shards, key=str) == [(0, 2), (1, 2)]
    assert [g.id for g in first.guilds] == [fake.other_guild_id]  # (id >> 22) % 2 == 0
    assert [g.id for g in second.guilds] == [fake.guild_id]  # (id >> 22) % 2 == 1
    other = first.get_guild(fake.other_guild_id)
    assert other is not None and [c.id for c in other.text_channels] == [fake.elsewhere_id]


async def test_guild_events_go_to_their_shard_and_dms_to_shard_zero(
    fake: FakeDiscord, shards: tuple[ShardedClient, ShardedClient]
) -> None:
    first, second = shards
    in_first = fake.user_says(fake.elsewhere_id, fake.member, "on shard 0")
    in_second = fake.user_says(fake.general_id, fake.member, "on shard 1")
    in_dm = fake.user_says(fake.dm_channel(fake.member), fake.member, "a DM")
    await fake.wait_for(lambda: len(first.seen) == 2 and len(second.seen) == 1)
    last = fake.user_says(fake.general_id, fake.member, "the last one")
    await fake.wait_for(lambda: last in second.seen)

    assert first.seen == [in_first, in_dm]
    assert second.seen == [in_second, last]
    created = [data["id"] for event, data in fake.delivered((1, 2)) if event == "MESSAGE_CREATE"]
    assert created == [str(in_second), str(last)]


async def test_an_unsharded_session_still_gets_everything(fake: FakeDiscord) -> None:
    intents = discord.Intents.default()
    intents.message_content = True
    client = discord.Client(intents=intents, guild_ready_timeout=0.1)
    seen: list[int] = []
    client.event(_recorder(seen))
    running = asyncio.create_task(client.start(fake.token))
    try:
        await fake.wait_for(lambda: len(client.guilds) == 2, what="both guilds")
        assert fake.session_shards == [None]
        ids = [
            fake.user_says(fake.elsewhere_id, fake.member, "one"),
            fake.user_says(fake.general_id, fake.member, "two"),
            fake.user_says(fake.dm_channel(fake.member), fake.member, "three"),
        ]
        await fake.wait_for(lambda: seen == ids, what="all three messages")
    finally:
        await client.close()
        await running


def _recorder(seen: list[int]) -> Callable[[discord.Message], Coroutine[Any, Any, None]]:
    async def on_message(message: discord.Message) -> None:
        seen.append(message.id)

    return on_message


async def test_without_a_count_the_client_runs_what_gateway_bot_recommends(
    fake: FakeDiscord,
) -> None:
    client = ShardedClient()
    running = await _running(fake, client)
    try:
        assert client.shard_count == 3
        assert sorted(fake.session_shards, key=str) == [(0, 3), (1, 3), (2, 3)]
        assert {g.id for g in client.guilds} == {fake.guild_id, fake.other_guild_id}
    finally:
        await client.close()
        await running


@pytest.mark.parametrize("shard", [[2, 2], [-1, 2], [0, 0], [0], "0,2", [True, 2]])
async def test_a_bad_shard_in_identify_is_closed_with_4010(
    fake: FakeDiscord, shard: object
) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(fake.gateway_url) as ws:
        hello = json.loads((await ws.receive()).data)
        assert hello["op"] == 10
        identify = {"token": fake.token, "intents": 0, "properties": {}, "shard": shard}
        await ws.send_str(json.dumps({"op": 2, "d": identify}))
        closing = await ws.receive()
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4010
    assert fake.session_shards == []
