"""A Discord message answered costs few Redis round trips: each is paid by every message, on
the path between the user's message and the bot's answer (BENCHMARKS.md's targets). Counted
on the wire, by a proxy between the bot and redis-server, so commands run inside scripts
count as the one script call the bot made."""

from __future__ import annotations

from benchmarks.roundtrips import CountingProxy
from tests.conftest import RedisServer
from tests.discord_harness import Harness
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

MESSAGES = 3

CALLS_PER_MESSAGE = 4
"""`begin_turn` (which also brings the place's last answer, where a mention's channel
context starts), the usage charge (the server's day, the session's totals: two hash slots),
`finish_turn`, and `note_answer` (where the answer went, for /retry)."""
ROUND_TRIPS_PER_MESSAGE = 3
"""The usage charge and `finish_turn` are made together, so the scripts' shared connection
(`AutoPipeline`) writes them in one go and reads both replies."""


async def test_a_mention_costs_one_script_call_per_step_and_no_extra_read(
    redis_url: str, redis_server: RedisServer
) -> None:
    proxy = await CountingProxy(redis_server.port).start()
    try:
        with FakeDiscord() as fake, fake.point_discord_py_here(), FakeDedalusAPI() as api:
            harness = Harness(fake, api, proxy.url)
            await harness.start()
            try:
                general = fake.general_id
                await harness.say(general, fake.member, "warm up", mentions_bot=True)
                await harness.answer(general)
                proxy.reset()  # scripts loaded, the place noted, its settings known
                for i in range(MESSAGES):
                    await harness.say(general, fake.member, f"question {i}", mentions_bot=True)
                    await harness.answer(general, i + 2)  # and its turn ended
                counted = dict(proxy.commands)
                round_trips = proxy.round_trips
            finally:
                await harness.stop()
    finally:
        await proxy.close()
    assert counted == {"FCALL": CALLS_PER_MESSAGE * MESSAGES}  # functions of one library
    assert round_trips == ROUND_TRIPS_PER_MESSAGE * MESSAGES
