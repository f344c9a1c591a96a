"""``ctx.run``: run a command and stream each line of its output to the run's log.

CI drivers mostly run commands. Output goes to the log line by line as it appears, so a
build's progress shows live in Conveyor and Loki; only a bounded tail is kept in memory. The
command runs in a process group of its own, so a timeout or a cancelled handler kills what
it started too, not only the shell.

Output reaches the log a whole line at a time, however the command's writes were cut into
chunks, so a secret split across two writes is whole again when the log's redactor sees
it. A line too long for one log line is logged in pieces; a piece never ends inside a
secret (see :meth:`~conveyor_driver.logs.redact.Redactor.safe_cut`), nor inside a UTF-8
character.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from structlog.typing import FilteringBoundLogger

from ._reaper import REAPER
from .logs.redact import Redactor
from .outcomes import Fail
from .telemetry import INSTRUMENTATION

#: Seconds a stopped command gets between SIGTERM and SIGKILL (``Driver(kill_grace=...)``).
KILL_GRACE = 10.0
#: Bytes of each stream kept in the result (the log has every line).
CAPTURE_LIMIT = 64 * 1024
_LINE_LIMIT = 64 * 1024


@attrs.frozen
class CommandResult:
    """How a command ended; ``stdout``/``stderr`` are the last CAPTURE_LIMIT bytes."""

    args: str | tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


async def run_command(
    log: FilteringBoundLogger,
    cmd: str | Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = False,
    kill_grace: float = KILL_GRACE,
    redactor: Redactor | None = None,
) -> CommandResult:
    """Run ``cmd`` (a shell string or an argv list), logging its lines as they come.

    ``env`` is added to the driver's environment rather than replacing it, so ``PATH``
    stays. With ``check``, a non-zero exit or a timeout raises :class:`Fail`. The command
    is a child span of the run (named after the program, so names stay few). A timeout or
    a cancelled handler (its deadline, a shutdown) stops the command's whole process group:
    SIGTERM first, so build tools can clean up, and SIGKILL after ``kill_grace`` seconds.
    ``redactor`` masks the driver's secrets in the result's ``stdout`` and ``stderr`` too
    (``check`` puts stderr into the failure, which reaches the log and the server).
    """
    text = cmd if isinstance(cmd, str) else " ".join(cmd)
    program = text.split(maxsplit=1)[0] if text.strip() else "command"
    tracer = trace.get_tracer(INSTRUMENTATION)
    with tracer.start_as_current_span(
        f"run {os.path.basename(program)}",
        attributes={"process.command_line": text},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        result = await _run(
            log, cmd, cwd=cwd, env=env, timeout=timeout, kill_grace=kill_grace, redactor=redactor
        )
        span.set_attribute("process.exit.code", result.exit_code)
        if not result.ok:
            span.set_status(Status(StatusCode.ERROR, "timed out" if result.timed_out else None))
    if check and not result.ok:
        if result.timed_out:
            what = f"timed out after {timeout:g}s"
        else:
            what = f"exited with {result.exit_code}"
        raise Fail(
            f"command {what}",
            data={"exit_code": result.exit_code, "stderr": result.stderr[-2000:]},
        )
    return result


async def _run(
    log: FilteringBoundLogger,
    cmd: str | Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    timeout: float | None,
    kill_grace: float,
    redactor: Redactor | None = None,
) -> CommandResult:
    full_env = {**os.environ, **env} if env is not None else None
    started = time.monotonic()
    options: dict[str, Any] = {
        "stdout": asyncio.subprocess.PIPE,
        "stderr": asyncio.subprocess.PIPE,
        "stdin": asyncio.subprocess.DEVNULL,
        "cwd": cwd,
        "env": full_env,
        "start_new_session": True,  # its own process group, so a kill reaches its children
    }
    args: str | tuple[str, ...]
    if isinstance(cmd, str):
        args = cmd
        process = await asyncio.create_subprocess_shell(cmd, **options)
    else:
        args = tuple(cmd)
        process = await asyncio.create_subprocess_exec(*args, **options)
    # start_new_session made it the leader of its group: the pid is the group's id.
    REAPER.register(process.pid)
    try:
        log.info("command started", command=args if isinstance(args, str) else " ".join(args))
        assert process.stdout is not None and process.stderr is not None
        tails = {"stdout": _Tail(), "stderr": _Tail()}
        readers = asyncio.gather(
            _pump(process.stdout, "stdout", log, tails["stdout"], redactor),
            _pump(process.stderr, "stderr", log, tails["stderr"], redactor),
            process.wait(),
        )
        timed_out = False
        try:
            await asyncio.wait_for(readers, timeout)
        except TimeoutError:
            timed_out = True
            await _stop_group(process, kill_grace)
        except asyncio.CancelledError:
            await asyncio.shield(_stop_group(process, kill_grace))
            raise
    finally:
        REAPER.unregister(process.pid)
    exit_code = process.returncode if process.returncode is not None else -1
    stdout, stderr = tails["stdout"].text(), tails["stderr"].text()
    if redactor is not None:
        stdout, stderr = redactor.mask(stdout), redactor.mask(stderr)
    result = CommandResult(
        args=args,
        exit_code=exit_code,
        stdout=stdout,
        stderr=stderr,
        duration=time.monotonic() - started,
        timed_out=timed_out,
    )
    if timed_out:
        log.warning("command timed out; process group stopped", timeout=timeout)
    else:
        log.info("command finished", exit_code=exit_code, duration=round(result.duration, 3))
    return result


class _Tail:
    """The last CAPTURE_LIMIT bytes of a stream, kept line by line."""

    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._size = 0

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > CAPTURE_LIMIT and len(self._lines) > 1:
            self._size -= len(self._lines.popleft()) + 1

    def text(self) -> str:
        return "".join(line + "\n" for line in self._lines)


async def _pump(
    stream: asyncio.StreamReader,
    name: str,
    log: FilteringBoundLogger,
    tail: _Tail,
    redactor: Redactor | None = None,
) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carried = ""  # the end of a long line's piece, held back for the next piece
    while True:
        whole = True
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:
            raw = end.partial
            if not raw and not carried:
                return
        except asyncio.LimitOverrunError as long_line:
            # Take one piece and leave the rest of the line for the next turn: a long line
            # becomes several log lines, with nothing lost and no empty line invented.
            raw = await stream.readexactly(min(long_line.consumed, _LINE_LIMIT))
            whole = False
        text = carried + decoder.decode(raw[:_LINE_LIMIT], final=whole)
        carried = ""
        if whole:
            line = text.rstrip("\r\n")
        else:
            cut = redactor.safe_cut(text) if redactor is not None else len(text)
            line, carried = text[:cut], text[cut:]
            if not line:
                continue
        tail.add(line)
        log.info(line, stream=name)


async def _stop_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the group, give it ``grace`` seconds, then SIGKILL whatever is left of it.

    The group is signalled again even when its leader went at once: a child that ignores
    SIGTERM would otherwise outlive the command.
    """
    _signal_group(process, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), grace)
    _signal_group(process, signal.SIGKILL)
    await process.wait()


def _signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
