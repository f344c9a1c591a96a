"""Running ``conveyor-driver`` as a real child process, the way an operator runs it.

Used by tests/test_cli.py and tests/test_processes.py. The command is resolved beside the
running Python (the venv's console script), so the tests exercise the installed entry point
of whatever clone they run in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson
from nats.aio.client import Client

from conveyor_driver import protocol

APPS = Path(__file__).resolve().parent
_SCRIPT = Path(sys.executable).parent / "conveyor-driver"
CLI: tuple[str, ...] = (
    (str(_SCRIPT),) if _SCRIPT.is_file() else (sys.executable, "-m", "conveyor_driver.cli")
)
#: Generous: two cores shared with other test runs, and a child starts a Python each time.
TIMEOUT = 60.0


def app(spec: str) -> str:
    """``file.py:attr`` of an app in tests/apps, as an absolute path any cwd can load."""
    return str(APPS / spec)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without CONVEYOR_* settings a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@attrs.frozen
class Completed:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = TIMEOUT
) -> Completed:
    """Run one ``conveyor-driver`` command to its end; a hang fails the test."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"conveyor-driver {' '.join(args)} still running after {timeout}s\n"
            f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}"
        ) from None
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(), err.decode())


def parse_json_line(line: str) -> dict[str, Any] | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class DriverProcess:
    """A running ``conveyor-driver run`` whose stderr is collected line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._changed = asyncio.Condition()
        self._eof = False
        assert proc.stderr is not None and proc.stdout is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stderr, self.stderr_lines, eof=True)),
            asyncio.create_task(self._read(proc.stdout, self.stdout_lines, eof=False)),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def records(self) -> list[dict[str, Any]]:
        """The stderr lines that are JSON log records."""
        return [r for r in map(parse_json_line, self.stderr_lines) if r is not None]

    @property
    def output(self) -> str:
        return "\n".join(self.stderr_lines)

    async def _read(self, stream: asyncio.StreamReader, into: list[str], *, eof: bool) -> None:
        while line := await stream.readline():
            async with self._changed:
                into.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        if eof:
            async with self._changed:
                self._eof = True
                self._changed.notify_all()

    async def wait_for_log(
        self, event: str, timeout: float = TIMEOUT, **fields: object
    ) -> dict[str, Any]:
        """The first JSON log record with this event text (and these fields)."""

        def find() -> dict[str, Any] | None:
            for record in self.records:
                if record.get("event") == event and all(
                    record.get(k) == v for k, v in fields.items()
                ):
                    return record
            return None

        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: find() is not None or self._eof), timeout
                )
            except TimeoutError:
                raise AssertionError(
                    f"no log {event!r} {fields} within {timeout}s:\n{self.output}"
                ) from None
        found = find()
        if found is None:
            raise AssertionError(f"process ended without logging {event!r}:\n{self.output}")
        return found

    async def started(self) -> dict[str, Any]:
        """Wait until the consumer exists and pulls (the runtime logs it last at start)."""
        return await self.wait_for_log("driver started")

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status; the process not ending in time fails the test."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"process still running after {timeout}s:\n{self.output}"
            ) from None
        await asyncio.gather(*self._readers)
        return code

    async def close(self) -> None:
        """Stop the process whatever state the test left it in."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def cli_process(
    *argv: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[DriverProcess]:
    """The command ``argv`` (a ``conveyor-driver`` command, or Python) for the length of the
    block."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else clean_env(),
        # Its own session: a Ctrl-C meant for pytest does not reach it mid-test.
        start_new_session=True,
    )
    process = DriverProcess(proc)
    try:
        yield process
    finally:
        await process.close()


def driver_process(
    *args: str, env: Mapping[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[DriverProcess]:
    """``conveyor-driver run ARGS`` for the length of the block."""
    return cli_process(*CLI, "run", *args, env=env)


async def wait_settled(
    nc: Client, consumer: str, check: Callable[[Any], bool], timeout: float = TIMEOUT
) -> Any:
    """Consumer info once ``check`` holds: acks are asynchronous, so poll for them."""
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await js.consumer_info(protocol.MESSAGES_STREAM, consumer)
        if check(info):
            return info
        if loop.time() > deadline:
            raise AssertionError(f"consumer {consumer!r} never settled: {info}")
        await asyncio.sleep(0.1)
