"""A real Redis Cluster on loopback ports, for the tests and the benchmarks."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisClusterNodes:
    """A real Redis Cluster: three primaries on free loopback ports, joined by redis-cli as
    an operator would, each owning a third of the hash slots."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError(
                "redis-server and redis-cli are not installed; .ci/run installs them"
            )
        self.ports = [_free_node_port() for _ in range(nodes)]
        self.processes = [
            subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
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
        ]
        for port in self.ports:
            until_answers(port)
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{port}" for port in self.ports]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for port in self.ports:
            client = redis.Redis(port=port, decode_responses=True)
            while client.cluster("info").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, "the cluster never came up"
                time.sleep(0.05)
            client.close()

    @property
    def url(self) -> str:
        """One node; the client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def flush(self) -> None:
        for port in self.ports:
            client = redis.Redis(port=port)
            client.flushall()
            client.close()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(10)


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
