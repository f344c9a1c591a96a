"""A TCP proxy between a NATS client and nats-server that drops chosen client frames.

It reads the client's side of the NATS protocol frame by frame (a control line, and for
``PUB``/``HPUB`` the payload the line announces) and forwards each frame unless a rule
says to drop it; the server's side is passed through untouched. Dropping a frame on the
wire is what a lost ack looks like to JetStream: the client believes it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

#: Decides, for each ``PUB``/``HPUB`` frame (subject, payload without headers), whether
#: to drop it.
DropRule = Callable[[str, bytes], bool]


class FaultProxy:
    """Listens on a free loopback port; ``url`` is what the client connects to."""

    def __init__(self, upstream_host: str, upstream_port: int, drop: DropRule) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._drop = drop
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: The frames dropped so far, as (subject, payload).
        self.dropped: list[tuple[str, bytes]] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"nats://{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._upstream)
        up = asyncio.ensure_future(self._client_to_server(client_r, server_w))
        down = asyncio.ensure_future(_pipe(server_r, client_w))
        self._tasks.update((up, down))
        try:
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, server_w):
                writer.close()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            line = await reader.readuntil(b"\r\n")
            op = line[:5].upper()
            if not (op.startswith(b"PUB ") or op.startswith(b"HPUB ")):
                writer.write(line)
                await writer.drain()
                continue
            parts = line.split()
            size = int(parts[-1])
            frame = await reader.readexactly(size + 2)
            headers = int(parts[-2]) if op.startswith(b"HPUB") else 0
            subject = parts[1].decode()
            payload = frame[headers:size]
            if self._drop(subject, payload):
                self.dropped.append((subject, payload))
                continue
            writer.write(line + frame)
            await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@contextlib.asynccontextmanager
async def fault_proxy(url: str, drop: DropRule) -> AsyncIterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the nats-server at ``url`` (``nats://host:port``)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    proxy = FaultProxy(host, int(port), drop)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def drop_first_acks(count: int = 1) -> DropRule:
    """Drop the first ``count`` JetStream acks (``+ACK`` to a ``$JS.ACK.`` subject)."""
    left = [count]

    def rule(subject: str, payload: bytes) -> bool:
        if left[0] and subject.startswith("$JS.ACK.") and payload == b"+ACK":
            left[0] -= 1
            return True
        return False

    return rule
