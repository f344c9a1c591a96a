"""A 3-node JetStream cluster on loopback, for fault tests that kill leaders.

Real ``nats-server`` processes (the binary :func:`~conveyor_driver.embedded.find_nats_server`
finds), routed to each other, each with its own JetStream store under the test's tmp_path.
A node is killed with SIGKILL, as a crashed machine would be, and started again on the
same ports and store, as an operator's supervisor would: its raft groups then catch up
from the others. Every wait is bounded and polls a condition: elections take seconds, and
the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import ClusterInfo

from conveyor_driver.embedded import find_nats_server, free_port

T = TypeVar("T")

#: How long a node may take to listen, or the cluster to elect and catch up, before the
#: test fails: elections take a few seconds; two busy cores make that several.
READY_TIMEOUT = 45.0
CLUSTER_NAME = "conveyor-test"


class Node:
    """One ``nats-server`` of the cluster: its name, its two ports and its store."""

    def __init__(self, name: str, root: Path, ports: tuple[int, int]) -> None:
        self.name = name
        self.port, self.cluster_port = ports
        self.store_dir = root / name
        self.log_file = root / f"{name}.log"
        self.config_file = root / f"{name}.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self, peers: Iterable[Node]) -> None:
        routes = ", ".join(f"nats://127.0.0.1:{peer.cluster_port}" for peer in peers)
        self.config_file.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
            f"cluster {{\n  name: {CLUSTER_NAME}\n"
            f"  listen: 127.0.0.1:{self.cluster_port}\n"
            f"  routes: [{routes}]\n}}\n"
        )

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [find_nats_server(), "-c", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest does not reach it
            )

    def kill(self) -> None:
        """SIGKILL, and reap it: nothing is flushed, nothing is said to the peers."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    async def listening(self) -> bool:
        """Whether this node's own process answers on its client port (an INFO line)."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            line = await asyncio.wait_for(reader.readline(), 1.0)
        except (TimeoutError, OSError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return line.startswith(b"INFO ") and f'"server_name":"{self.name}"'.encode() in line


class JetStreamCluster:
    """Nodes ``n1``..``n<size>`` under ``root``; an async context manager that starts them
    and, however the test ends, kills every one of them."""

    def __init__(self, root: Path, size: int = 3) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        ports = _distinct_ports(2 * size)
        self.nodes = {
            f"n{i}": Node(f"n{i}", root, (ports[2 * i - 2], ports[2 * i - 1]))
            for i in range(1, size + 1)
        }
        for node in self.nodes.values():
            node.write_config(peer for peer in self.nodes.values() if peer is not node)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    async def __aenter__(self) -> JetStreamCluster:
        try:
            for node in self.nodes.values():
                node.start()
            await self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(
        self,
        _exc_type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()

    async def connect(self) -> Client:
        """A client that knows every node and reconnects for ever (nodes come and go)."""
        return await nats.connect(
            self.urls,
            connect_timeout=2,
            reconnect_time_wait=0.2,
            max_reconnect_attempts=-1,
        )

    async def wait_ready(self) -> None:
        """Every node listens, and JetStream answers: the meta group has a leader."""
        await poll(self._all_listening, what="every node listening")
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=2.0)
            await poll(lambda: answers(js.account_info()), what="a JetStream meta leader")
        finally:
            await nc.close()

    async def _all_listening(self) -> bool:
        return all([await node.listening() for node in self.nodes.values()])

    def kill(self, name: str) -> None:
        self.nodes[name].kill()

    async def restart(self, name: str) -> None:
        """The node again, on the same ports and store dir; returns once it listens."""
        node = self.nodes[name]
        node.start()
        await poll(node.listening, what=f"{name} listening again")

    async def wait_healthy(self, nc: Client, streams: Iterable[str], consumer: str = "") -> None:
        """Each stream (and ``consumer`` on the first) has a leader and every other peer is
        online and current: the cluster is whole again, so the next kill is a single fault."""
        js = nc.jetstream(timeout=2.0)
        names = list(streams)

        async def whole() -> bool:
            for stream in names:
                if not complete((await js.stream_info(stream)).cluster, len(self.nodes)):
                    return False
            if consumer:
                info = await js.consumer_info(names[0], consumer)
                return complete(info.cluster, len(self.nodes))
            return True

        await poll(lambda: answers(whole()), what=f"{names} {consumer} whole again")

    async def stream_leader(self, nc: Client, stream: str) -> str:
        js = nc.jetstream(timeout=2.0)
        return await poll(lambda: leader_of(js.stream_info(stream)), what=f"{stream}'s leader")

    async def consumer_leader(self, nc: Client, stream: str, consumer: str) -> str:
        js = nc.jetstream(timeout=2.0)
        return await poll(
            lambda: leader_of(js.consumer_info(stream, consumer)), what=f"{consumer}'s leader"
        )


def _distinct_ports(count: int) -> list[int]:
    """Free ports, no two alike (a port freed by one probe may be handed to the next)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def complete(cluster: ClusterInfo | None, size: int) -> bool:
    """A leader, and ``size - 1`` other replicas, each online and current."""
    if cluster is None or not cluster.leader:
        return False
    replicas = cluster.replicas or []
    return len(replicas) == size - 1 and all(r.current and not r.offline for r in replicas)


async def answers(request: Awaitable[T]) -> T | None:
    """The answer, or None while the cluster cannot give one (an election, a dead node)."""
    try:
        return await request
    except (NatsError, TimeoutError):
        return None


async def leader_of(request: Awaitable[object]) -> str | None:
    info = await answers(request)
    cluster: ClusterInfo | None = getattr(info, "cluster", None)
    return cluster.leader if cluster is not None and cluster.leader else None


async def poll(
    check: Callable[[], Awaitable[T | None]], *, what: str, timeout: float = READY_TIMEOUT
) -> T:
    """The first truthy result of ``check``; AssertionError naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.1)
