"""While turns run on many places at once, the Redis Cluster under them fails a primary over
(as an operator does, `CLUSTER FAILOVER`), moves a place's slot to another primary (as
`redis-cli --cluster reshard` does), and loses a primary (`SIGKILL`, its replica taking over):
a turn is answered or gets the storage line, never another error and never a hang; the
next message of every place is answered; and every stored history is whole, each question
followed by its own answer, once, in order. A primary that freezes (`SIGSTOP`) rather than
dies, its replica taking over, is left behind the same way."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from bot.engine import Engine, EngineLimits
from bot.errors import StoreUnavailable
from bot.model import DedalusModel
from bot.store.base import StorePolicy, Ticket
from bot.store.redis import RedisStore, scope_key
from tests.conftest import TEST_MODELS
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.redis_cluster import RedisClusterNodes

PLACES_PER_PRIMARY = 3
ANSWERED, UNAVAILABLE = "answered", "unavailable"
DEADLINE = 2.0
"""The store's call deadline in the frozen-primary test (5 s in the bot): each call on the
frozen node waits this long."""
NODE_TIMEOUT_MS = 3000
"""The frozen-primary test's cluster: its replica is elected about this long after the primary
stops answering (15 s by default); long enough not to mistake a slow node for a dead one."""
TRIES = 4
"""Messages a place gets after its frozen primary's replica took over, before the test gives
up: the first may still go to the frozen node (the slot map is reloaded in the background
when a call runs out of time) and fail with the storage line; a later one must be answered."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """Its own cluster, with a replica per primary: the test changes its topology."""
    nodes = RedisClusterNodes(tmp_path, replicas=1)
    yield nodes
    nodes.stop()


def slot_of(scope: str) -> int:
    return key_slot(scope_key(scope, "state").encode())


def places_on(cluster: RedisClusterNodes) -> dict[int, list[str]]:
    """A few places on each primary, by the primary's port."""
    found: dict[int, list[str]] = {port: [] for port in cluster.primaries()}
    i = 0
    while any(len(places) < PLACES_PER_PRIMARY for places in found.values()):
        scope = f"place{i}"
        owned = found[cluster.owner(slot_of(scope))]
        if len(owned) < PLACES_PER_PRIMARY:
            owned.append(scope)
        i += 1
    return found


@pytest.mark.timeout(300)
async def test_turns_in_flight_ride_out_failovers_and_a_slot_move(
    cluster: RedisClusterNodes,
) -> None:
    on = places_on(cluster)
    first, second, third = sorted(on)
    scopes = [scope for places in on.values() for scope in places]
    outcomes: dict[str, list[tuple[int, str]]] = {scope: [] for scope in scopes}
    faults_done = asyncio.Event()
    loop = asyncio.get_running_loop()

    with FakeDedalusAPI() as api:
        store = RedisStore.from_url(cluster.url, StorePolicy(TEST_MODELS[0]), cluster=True)
        model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 10_000, lock_ms=6000))

        async def talk(scope: str) -> None:
            """Turn after turn until the faults are over, then one more: the next message."""
            turn = 0
            while True:
                last = faults_done.is_set()
                ref = str(10**12 + len(scopes) * turn + scopes.index(scope))
                message = {"role": "user", "content": f"{scope} turn {turn}"}
                try:
                    await engine.reply(scope, message, user_ref=ref, claim=ref)
                    outcomes[scope].append((turn, ANSWERED))
                except StoreUnavailable:
                    outcomes[scope].append((turn, UNAVAILABLE))
                turn += 1
                if last:
                    return

        async def progress(places: list[str], turns: int = 2) -> None:
            """Until each of `places` has ended `turns` more turns, however they ended."""
            start = {scope: len(outcomes[scope]) for scope in places}
            while any(len(outcomes[s]) < start[s] + turns for s in places):  # noqa: ASYNC110
                await asyncio.sleep(0.01)

        def between(places: list[str]) -> Callable[[], None]:
            """For the cluster's helper thread: wait there for turns on `places`."""
            return lambda: asyncio.run_coroutine_threadsafe(progress(places), loop).result()

        async def faults() -> None:
            await progress(scopes, 1)
            # An operator's failover: the replica takes over once it has all the writes.
            await asyncio.to_thread(cluster.failover, cluster.replica_of(first))
            await progress(scopes)
            # The first place of the second primary moves to the third, key batch by batch.
            moved = on[second][0]
            await asyncio.to_thread(cluster.move_slot, slot_of(moved), third, between([moved]))
            await progress(scopes)
            # The third primary dies; its replica takes over without it.
            replica = cluster.replica_of(third)
            cluster.kill(third)
            await asyncio.to_thread(cluster.failover, replica, "TAKEOVER")
            await progress(scopes)
            faults_done.set()

        async with asyncio.timeout(240):  # a hang fails here, not in pytest's timeout
            await asyncio.gather(faults(), *(talk(scope) for scope in scopes))

        # The killed primary may have acknowledged writes its replica never got (Redis
        # replicates asynchronously): those turns are gone whole, never in part.
        lossy = set(on[third]) | {on[second][0]}
        for scope in scopes:
            assert outcomes[scope][-1][1] == ANSWERED, (scope, outcomes[scope])
            history = await store.read_history(scope, "default")
            questions, answers = history[0::2], history[1::2]
            assert len(questions) == len(answers)
            assert all(q["role"] == "user" for q in questions)
            assert answers == [
                {"role": "assistant", "content": f"echo: {q['content']}"} for q in questions
            ]
            stored = [int(str(q["content"]).rsplit(" ", 1)[1]) for q in questions]
            assert stored == sorted(set(stored)), (scope, stored)  # in order, none twice
            answered = [turn for turn, outcome in outcomes[scope] if outcome == ANSWERED]
            if scope in lossy:
                assert set(stored) <= {turn for turn, _ in outcomes[scope]}
                assert answered[-1] in stored
            else:
                assert set(answered) <= set(stored), (scope, answered, stored)
        await store.close()


def assert_whole(history: list[dict[str, object]], outcomes: list[tuple[int, str]]) -> None:
    """Each stored question followed by its own answer, once, in order; every turn answered
    is stored, and nothing stored that was not sent."""
    questions, answers = history[0::2], history[1::2]
    assert len(questions) == len(answers)
    assert all(q["role"] == "user" for q in questions)
    assert answers == [{"role": "assistant", "content": f"echo: {q['content']}"} for q in questions]
    stored = [int(str(q["content"]).rsplit(" ", 1)[1]) for q in questions]
    assert stored == sorted(set(stored)), stored
    answered = {turn for turn, outcome in outcomes if outcome == ANSWERED}
    assert answered <= set(stored) <= {turn for turn, _ in outcomes}, (outcomes, stored)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("failover", ["takeover", "by-the-cluster"])
async def test_turns_on_a_frozen_primary_go_to_its_replica_once_it_took_over(
    tmp_path: Path, failover: str
) -> None:
    """A primary paused (`SIGSTOP`: its connections open, nothing answering), its replica
    taking over: turns on every place meanwhile get the storage line at worst, and after the
    takeover each place's next messages are answered within a few tries, while the old
    primary is still frozen (before, every call on its slots kept going to the frozen node and
    failed at the deadline for as long as it stayed frozen). The client was given the frozen
    node's address when it has one of the primaries. The replica takes over by an operator's
    `CLUSTER FAILOVER TAKEOVER`, or is elected by the cluster once the primary has not answered
    for the node timeout (every slot refused as the cluster being down in between: redis-py
    reloads its map on that refusal by itself, so this case passed before too; the takeover
    case did not)."""
    cluster = RedisClusterNodes(tmp_path, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS)
    try:
        await frozen_primary_case(cluster, failover)
    finally:
        cluster.stop()


async def frozen_primary_case(cluster: RedisClusterNodes, failover: str) -> None:
    on = places_on(cluster)
    victim = cluster.ports[0] if cluster.ports[0] in on else sorted(on)[0]
    scopes = [scope for places in on.values() for scope in places]
    outcomes: dict[str, list[tuple[int, str]]] = {scope: [] for scope in scopes}
    numbers = itertools.count()

    with FakeDedalusAPI() as api:
        store = RedisStore.from_url(
            cluster.url, StorePolicy(TEST_MODELS[0]), cluster=True, call_timeout=DEADLINE
        )
        model = DedalusModel.connect("test-key", api.base_url, timeout=30, max_retries=0)
        engine = Engine(store, model, EngineLimits("system", 10_000, lock_ms=6000))

        async def turn(scope: str) -> str:
            number = next(numbers)
            ref = str(10**12 + number)
            message = {"role": "user", "content": f"{scope} turn {number}"}
            try:
                await engine.reply(scope, message, user_ref=ref, claim=ref)
                outcome = ANSWERED
            except StoreUnavailable:
                outcome = UNAVAILABLE
            outcomes[scope].append((number, outcome))
            return outcome

        async def talk(scope: str) -> None:
            """Turns while the primary is replaced, a few a second (no need to flood)."""
            while not replaced.is_set():
                await turn(scope)
                await asyncio.sleep(0.1)

        replaced = asyncio.Event()
        for scope in scopes:
            assert await turn(scope) == ANSWERED
        # Every write is on the replica before its primary stops, so a takeover loses none.
        assert cluster.command(victim, "WAIT", 1, 10_000) == 1
        replica = cluster.replica_of(victim)
        cluster.freeze(victim)
        try:
            in_flight = [asyncio.create_task(talk(scope)) for scope in scopes]
            if failover == "takeover":
                await asyncio.to_thread(cluster.failover, replica, "TAKEOVER")
            else:
                await asyncio.to_thread(cluster.promoted, replica)
            replaced.set()
            await asyncio.gather(*in_flight)  # answered or the storage line, nothing else
            for scope in scopes:
                for _ in range(TRIES):
                    if await turn(scope) == ANSWERED:
                        break
                else:
                    pytest.fail(f"{scope} on the frozen primary's slots: {outcomes[scope]}")
        finally:
            cluster.thaw(victim)
        for scope in scopes:
            assert_whole(await store.read_history(scope, "default"), outcomes[scope])
        await store.close()


async def test_a_save_refused_while_its_slot_moves_writes_nothing(
    redis_cluster: RedisClusterNodes, redis_cluster_url: str
) -> None:
    """Mid-move, the old node still holds the session but not the keys a save would add: the
    save fails whole (before, it marked the message answered, then failed; told "nothing was
    changed", its author's message would never have been answered again) and succeeds once
    the slot is settled."""
    store = RedisStore.from_url(redis_cluster_url, StorePolicy(TEST_MODELS[0]), cluster=True)
    scope = "moving"
    slot = slot_of(scope)
    turn = await store.begin_turn(scope, Ticket.now("123"), 10_000, 15_000)
    exchange = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    target = next(port for port in redis_cluster.primaries() if port != redis_cluster.owner(slot))

    def stored() -> dict[str, object]:
        keys = redis_cluster.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
        node = redis_cluster.client(source)
        try:
            return {key: node.dump(key) for key in keys}
        finally:
            node.close()

    source = redis_cluster.owner(slot)
    before = stored()
    redis_cluster.migrating(slot, target)
    try:
        with pytest.raises(StoreUnavailable):
            await store.finish_turn(turn, exchange, "123")
        assert stored() == before
    finally:
        for port in (source, target):
            redis_cluster.command(port, "CLUSTER", "SETSLOT", slot, "STABLE")
    assert await store.finish_turn(turn, exchange, "123")
    assert await store.read_history(scope, "default") == exchange
    await store.close()
