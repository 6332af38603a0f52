"""A real Redis Cluster on loopback ports, for the tests and the benchmarks."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis


class RedisClusterNodes:
    """A real Redis Cluster: `primaries` primaries on free loopback ports, joined by redis-cli
    as an operator would, each owning a share of the hash slots, and `replicas` replicas of
    each (none by default: the store's tests need no failover and start faster without)."""

    def __init__(
        self,
        directory: Path,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 15_000,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError(
                "redis-server and redis-cli are not installed; .ci/run installs them"
            )
        self.ports = [_free_node_port() for _ in range(primaries * (1 + replicas))]
        self.frozen: set[int] = set()
        """Nodes paused by `freeze`: alive, but answering nothing."""
        self.processes = {
            port: subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(directory),
                ],
                stdout=subprocess.DEVNULL,
            )
            for port in self.ports
        }
        try:
            self._join(replicas)
        except BaseException:
            self.stop()
            raise

    def _join(self, replicas: int) -> None:
        for port in self.ports:
            until_answers(port)
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{port}" for port in self.ports]
            + ["--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def settled() -> bool:
            """Up, and every node has heard of every replica (roles spread by gossip)."""
            return self._agreed(set()) and all(
                sum("slave" in str(n["flags"]) for n in self._nodes(port).values())
                == len(self.ports) // (1 + replicas) * replicas
                for port in self.ports
            )

        self.until(settled, "the cluster never came up")
        if replicas:
            self.until(
                lambda: all(
                    self.client(port).info("replication").get("master_link_status") == "up"
                    for port in self.replicas()
                ),
                "the replicas never caught up with their primaries",
            )

    @property
    def url(self) -> str:
        """One node; the client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    @property
    def live_ports(self) -> list[int]:
        return [
            port
            for port in self.ports
            if self.processes[port].poll() is None and port not in self.frozen
        ]

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=10)

    def command(self, port: int, *args: str | int) -> Any:
        """One command to one node (redis-py types `execute_command` loosely)."""
        client = self.client(port)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def flush(self) -> None:
        for port in self.primaries():
            client = self.client(port)
            client.flushall()
            client.close()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a paused node cannot stop
                process.terminate()
        for process in self.processes.values():
            process.wait(10)

    def _nodes(self, port: int) -> dict[int, dict[str, object]]:
        """CLUSTER NODES as `port` sees it, by port."""
        client = self.client(port)
        try:
            listed = client.cluster("nodes")
        finally:
            client.close()
        return {int(address.split(":")[1].split("@")[0]): node for address, node in listed.items()}

    def primaries(self) -> list[int]:
        """Live nodes that are primaries by their own account (`ROLE`). Another node's view
        lags a failover by a gossip round: it may still list the demoted primary as one, and
        a demoted primary refuses `CLUSTER SETSLOT`."""
        return [port for port in self.live_ports if self.command(port, "ROLE")[0] == "master"]

    def replicas(self) -> list[int]:
        seen = self._nodes(self.live_ports[0])
        return [p for p, node in seen.items() if "slave" in str(node["flags"])]

    def owner(self, slot: int, seen_from: int | None = None) -> int:
        """The primary serving `slot`, as `seen_from` (by default the first live node) sees
        it."""
        for port, node in self._nodes(seen_from or self.live_ports[0]).items():
            for held in node["slots"]:  # type: ignore[attr-defined]
                if int(held[0]) <= slot <= int(held[-1]):
                    return port
        raise LookupError(f"no node serves slot {slot}")

    def replica_of(self, primary: int) -> int:
        seen = self._nodes(self.live_ports[0])
        primary_id = seen[primary]["node_id"]
        return next(p for p, n in seen.items() if n["master_id"] == primary_id)

    def failover(self, replica: int, option: str | None = None) -> None:
        """`CLUSTER FAILOVER [FORCE|TAKEOVER]` on `replica`, then until every live node sees
        it as the primary of its slots, the old primary (if it still runs) knows it is now a
        replica, and the cluster answers again."""
        old_primary = int(self.command(replica, "ROLE")[2])  # slave, host, port, ...
        self.command(replica, "CLUSTER", "FAILOVER", *([option] if option else []))

        def promoted() -> bool:
            role = self.command(replica, "ROLE")
            return role[0] == "master" and self._agreed({replica})

        self.until(promoted, f"node {replica} never became a primary")
        if old_primary in self.live_ports:
            self.until(
                lambda: self.command(old_primary, "ROLE")[0] == "slave",
                f"node {old_primary} never stepped down",
            )

    def promoted(self, replica: int, seconds: float = 60) -> None:
        """Until the cluster itself made `replica` a primary (its primary failed) and every live
        node agrees."""
        self.until(
            lambda: self.command(replica, "ROLE")[0] == "master" and self._agreed({replica}),
            f"the cluster never promoted node {replica}",
            seconds,
        )

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait(10)

    def freeze(self, port: int) -> None:
        """Pause a node (`SIGSTOP`): its connections stay open and nothing answers, as with a
        stalled machine. The helpers here stop asking it until `thaw`."""
        self.frozen.add(port)
        self.processes[port].send_signal(signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGCONT)
        self.frozen.discard(port)

    def move_slot(self, slot: int, target: int, between: Callable[[], None]) -> None:
        """Move `slot` to the primary `target` as `redis-cli --cluster reshard` does: mark it
        importing there and migrating at its owner, MIGRATE its keys in two batches, then
        give it to `target` everywhere. `between` runs after each step, so a test sees the
        traffic of every state the slot passes through."""
        source = self.migrating(slot, target)
        between()
        first = True
        while keys := self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000):
            batch = keys[: max(1, len(keys) // 2)] if first else keys
            self.command(source, "MIGRATE", "127.0.0.1", target, "", 0, 10_000, "KEYS", *batch)
            first = False
            between()
        target_id = self._nodes(target)[target]["node_id"]
        for port in self.primaries():
            self.command(port, "CLUSTER", "SETSLOT", slot, "NODE", str(target_id))
        self.until(
            lambda: (
                self._agreed({target})
                and all(self.owner(slot, port) == target for port in self.live_ports)
            ),
            "the slot never moved",
        )
        between()

    def migrating(self, slot: int, target: int) -> int:
        """Mark `slot` importing at `target` and migrating at its owner, which is returned."""
        source = self.owner(slot)
        ids = {port: str(node["node_id"]) for port, node in self._nodes(source).items()}
        self.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        return source

    def _agreed(self, primaries: set[int]) -> bool:
        """Whether every live node says the cluster is up and lists `primaries` as primaries."""
        for port in self.live_ports:
            client = self.client(port)
            try:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
            finally:
                client.close()
            seen = self._nodes(port)
            if any("master" not in str(seen[p]["flags"]) for p in primaries):
                return False
        return True

    @staticmethod
    def until(condition: Callable[[], bool], failure: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, failure
            time.sleep(0.05)


def _free_node_port() -> int:
    """A free port whose cluster bus port (10000 above it, by Redis's rule) is free too and
    still a port: an ephemeral port above 55535 would leave the node unable to start."""
    while True:
        port = random.randrange(20_000, 55_000)
        with socket.socket() as node, socket.socket() as bus:
            try:
                node.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


def until_answers(port: int, password: str | None = None) -> None:
    """Until the redis-server on `port` answers a PING (10 s at most)."""
    client = redis.Redis(port=port, password=password)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    client.close()
