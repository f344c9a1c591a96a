"""A document's console examples, run as a reader would type them, their output compared.

A console block is commands after ``$ `` (continued by a trailing ``\\``) and, between them,
what they print; ``#`` lines are the reader's notes. Its commands run one after another with
``bash``, in the directory where ``tests/_readme.py`` wrote the document's Python blocks, so
``conveyor-driver run app:driver`` finds the ``app.py`` the page showed.

**Output.** A command must succeed. When the block shows lines after it, they are compared
with what it printed (stdout and stderr, as a terminal shows them), as doctest does with
``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``: ``...`` stands for any text, lines included
(``...`` alone on a line: any lines). Shown output that ends with a JSON value is compared
as JSON with the JSON the command printed last (key order and layout free, ``"..."`` any
value), so a page may show a result compacted; the lines before it are compared as text.
What differs from run to run needs no ``...``: a UUID (run and message ids) matches any
UUID, an ISO timestamp any timestamp, and the test's URLs, files and ports print as the
reader's (``127.0.0.1:4222``, ``https://github.com/...``). A command shown without output
is not compared. What a background command shows is what it printed until it was stopped;
the lines after those shown (its shutdown) are not compared.

What the runner arranges, so that examples written for a laptop run in the suite:

- **This environment's programs.** ``conveyor-driver``, ``python`` and ``pytest`` are the
  test's (its interpreter's directory comes first on ``PATH``); ``TMPDIR`` is inside the
  page's directory.
- **The reader's addresses are the test's peers.** Before a command runs, each text of the
  session's *places* table is replaced by the test's own (``tests/test_doc_examples.py``
  starts a peer only for a page that names it):

  - ``4222``, ``conveyor:4222``: a real nats-server on a free port, with the Conveyor
    streams (also ``CONVEYOR_NATS_URL``);
  - ``http://conveyor:8080``: the API server of ``tests/_conveyor_api_server.py``;
  - ``/etc/conveyor/driver.crt``, ``driver.key``, ``ca.pem``: a fresh PKI
    (``tests/_certs.py``); the NATS then speaks only TLS and verifies clients, and
    ``https://conveyor:8080`` is the API server on TLS, checking every token;
  - ``http://otel-collector:4318``: an OTLP/HTTP receiver (``tests/_otel.py``);
  - ``https://github.com/octocat/Hello-World``: a local git repository (``file://``);
  - ``/tmp/``: a directory of the page's own;
  - ``9090``, ``9464``, ``3100`` (probe and receiver ports): free ports.

  A document whose commands start their own server (``--embedded``) gets no NATS from the
  test. A document that runs ``APP.py:driver`` or ``app:driver`` without showing that file
  ("your app") gets a stand-in: a small greeter driver and its test.
- **Another terminal.** ``conveyor-driver run`` serves until stopped, so it always runs in
  the background, and the next command waits for its ``driver started`` line. Another
  command runs in the background when a note after it says ``another terminal`` or it ends
  with `` &``; it must name the ``--port`` it serves, and the next command waits until that
  port answers. What a background command prints is not part of the output compared for
  the commands after it (redirect it to a file to show it). Background commands stop
  (SIGTERM) when the document's commands are done, or at a note that starts with
  ``# stop``.
- **Waiting.** A note saying ``wait for `TEXT``` makes the next command wait until a
  background command prints TEXT after the previous command started (a reload's new
  ``driver started`` line, say).
- **Variables.** ``export NAME=value ...`` holds for the document's later commands, as in
  the reader's shell.
- **Installs.** ``pip install`` is not run (the test's environment has the package): each
  ``conveyor-driver[extra]`` it names must be an extra of ``pyproject.toml``.
- **The repository.** A block after ``<!-- run-in: repository -->`` runs in the test-suite's
  own clone (for ``make demo``, ``examples/``): it may only read there.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Generous: a 2-core machine shared with other test runs.
TIMEOUT = 90.0
_READY = "driver started"
_ANOTHER = re.compile(r"^#.*another terminal", re.IGNORECASE)
_STOP = re.compile(r"^#\s*stop\b", re.IGNORECASE)
_WAIT = re.compile(r"^#.*\bwait for [^`]*`([^`]+)`", re.IGNORECASE)
_EXTRAS = re.compile(r"conveyor-driver\[([^\]]+)\]")
_PORT = re.compile(r"--(?:http-)?port[ =](\d+)")
_DOCTEST = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Command:
    """One command of a console block: how it runs, and the output the block shows for it."""

    line: int
    text: str
    background: bool = False
    output: str = ""
    #: Stop the background commands before this one (a ``# stop ...`` note before it).
    stop_first: bool = False
    #: Wait until a background command prints this before running (``wait for `TEXT```).
    wait_for: str | None = None
    #: Runs in the test-suite's clone (``<!-- run-in: repository -->``).
    in_repository: bool = False


def commands(code: str, first_line: int = 0, *, in_repository: bool = False) -> list[Command]:
    """The commands of a console block; ``first_line``: the line of its fence."""
    found: list[Command] = []
    output: list[str] = []
    stop = False
    wait: str | None = None

    def close_output() -> None:
        if found and output:
            last = found[-1]
            found[-1] = _replace(last, output="\n".join(output).strip("\n") + "\n")
        output.clear()

    lines = code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if line.startswith("#"):
                if _ANOTHER.match(line) and found:
                    found[-1] = _replace(found[-1], background=True)
                stop = stop or bool(_STOP.match(line))
                waited = _WAIT.match(line)
                wait = waited[1] if waited else wait
            elif found:
                output.append(line)
            i += 1
            continue
        close_output()
        start = i
        parts = [line[2:]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        text = "\n".join(parts).strip()
        ampersand = text.endswith(" &")
        text = text.removesuffix("&").strip()
        found.append(
            Command(
                first_line + start + 1,
                text,
                ampersand or _serves(text),
                stop_first=stop,
                wait_for=wait,
                in_repository=in_repository,
            )
        )
        stop, wait = False, None
        i += 1
    close_output()
    return found


def _replace(command: Command, **changes: Any) -> Command:
    values = {**command.__dict__, **changes}
    return Command(**values)


def _words(text: str) -> list[str]:
    return shlex.split(text.replace("\\\n", " "), comments=True)


def _serves(text: str) -> bool:
    """Whether a command is a ``conveyor-driver run`` (after any ``VAR=value`` words)."""
    words = _words(text)
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words.pop(0)
    return words[:2] == ["conveyor-driver", "run"]


def known_extras() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["optional-dependencies"])


def check_install(command: Command) -> None:
    """A ``pip install`` names only extras that exist."""
    extras = known_extras()
    for group in _EXTRAS.findall(command.text):
        unknown = {e.strip() for e in group.split(",")} - extras
        assert not unknown, f"line {command.line}: no such extra {sorted(unknown)}"


def is_install(command: Command) -> bool:
    words = _words(command.text)
    return words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]


# --- comparing output ----------------------------------------------------------------------


_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_TIME = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?")


def _normal(text: str) -> str:
    return _TIME.sub("<time>", _UUID.sub("<uuid>", text))


def output_matches(shown: str, printed: str) -> bool:
    """Whether a command's output is what the page shows for it (see the module's doc)."""
    shown, printed = _normal(shown), _normal(printed)
    head, want = _split_json(shown)
    if want is _NOT_JSON:
        return _doctest_matches(shown, printed)
    got_head, got = _split_json(printed)
    return _doctest_matches(head, got_head) and _json_matches(want, got)


_NOT_JSON = object()


def _doctest_matches(shown: str, printed: str) -> bool:
    return doctest.OutputChecker().check_output(shown, printed, _DOCTEST)


def _split_json(text: str) -> tuple[str, Any]:
    """The lines before the JSON value that ends ``text``, and that value (if it has one)."""
    lines = text.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if line.startswith(("{", "[")):
            rest = "".join(lines[n:])
            with suppress(ValueError):
                value, end = json.JSONDecoder().raw_decode(rest)
                if not rest[end:].strip():
                    return "".join(lines[:n]), value
    return text, _NOT_JSON


def _json_matches(want: Any, got: Any) -> bool:
    if want == "...":
        return got is not _NOT_JSON
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and want.keys() == got.keys()
            and all(_json_matches(v, got[k]) for k, v in want.items())
        )
    if isinstance(want, list):
        return (
            isinstance(got, list) and len(want) == len(got) and all(map(_json_matches, want, got))
        )
    if isinstance(want, str) and "..." in want and isinstance(got, str):
        return doctest.OutputChecker().check_output(want, got, doctest.ELLIPSIS)
    return bool(want == got and type(want) is type(got))


# --- running -------------------------------------------------------------------------------


def environment(places: Mapping[str, str], tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "OTEL_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp)
    if "4222" in places:
        port = places["4222"].rsplit(":", 1)[-1]
        env["CONVEYOR_NATS_URL"] = f"nats://127.0.0.1:{port}"
        env["CONVEYOR_EMBEDDED_PORT"] = port
    return env


@dataclass
class _Background:
    command: Command
    proc: subprocess.Popen[bytes]
    log: Path
    #: How much of the log the output of the current foreground command starts after.
    mark: int = 0

    def text(self, start: int = 0) -> str:
        return self.log.read_bytes()[start:].decode(errors="replace")


class Session:
    """The commands of one document, in one directory, with their background commands.

    ``places`` maps a reader's text (an address, a path, a port) to the test's.
    """

    def __init__(self, cwd: Path, places: Mapping[str, str]) -> None:
        self.cwd = cwd
        self.places = dict(places)
        tmp = cwd / ".tmp"
        tmp.mkdir(exist_ok=True)
        self.env = environment(self.places, tmp)
        self._places = (
            re.compile(
                "|".join(
                    rf"\b{re.escape(k)}\b" if k.isdigit() else re.escape(k)
                    for k in sorted(self.places, key=len, reverse=True)
                )
            )
            if self.places
            else None
        )
        self._background: list[_Background] = []
        self._stopped: list[_Background] = []

    def _script(self, command: Command) -> str:
        if self._places is None:
            return command.text
        return self._places.sub(lambda m: self.places[m[0]], command.text)

    def run(self, command: Command) -> str:
        """Run ``command``; its output. A failure raises AssertionError with the output."""
        if command.stop_first:
            self.stop()
        if command.wait_for is not None:
            self._wait_for(command)
        if _words(command.text)[:1] == ["export"]:
            for assignment in _words(self._script(command))[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = value
            return ""
        if is_install(command):
            check_install(command)
            assert not command.output, f"line {command.line}: an install's output is not run"
            return ""
        for running in self._background:
            running.mark = running.log.stat().st_size
        if command.background:
            self._start(command)
            return ""
        done = subprocess.run(
            ["bash", "-c", self._script(command)],
            cwd=ROOT if command.in_repository else self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        output = self._as_shown(done.stdout)
        assert done.returncode == 0, (
            f"line {command.line}: `{command.text}` exited {done.returncode}:\n{output}"
            f"{self.background_output()}"
        )
        assert not command.output or output_matches(command.output, output), (
            f"line {command.line}: `{command.text}` printed what the page does not show.\n"
            f"--- the page shows:\n{command.output}--- it printed:\n{output}"
            f"{self.background_output()}"
        )
        return output

    def _as_shown(self, output: str) -> str:
        """The test's URLs, paths and ports in ``output`` written as the reader's."""
        for reader, test in sorted(self.places.items(), key=lambda p: -len(p[1])):
            if "://" in reader or reader.startswith("/"):
                output = output.replace(test, reader)
            elif test.isdigit():
                output = re.sub(rf"(?<=:){test}\b", reader, output)
        return output

    def _start(self, command: Command) -> None:
        script = self._script(command)
        serves = _serves(command.text)
        port = _PORT.search(script)
        assert serves or port, (
            f"line {command.line}: only `conveyor-driver run`, or a command naming the "
            "--port it serves, may run in the background"
        )
        log = self.cwd / f".background-{len(self._background) + len(self._stopped)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=ROOT if command.in_repository else self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = _Background(command, proc, log)
        self._background.append(started)
        deadline = time.monotonic() + TIMEOUT
        while not (_READY in started.text() if serves else _answers(int(port[1]))):  # type: ignore[index]
            assert proc.poll() is None, (
                f"line {command.line}: `{command.text}` exited {proc.returncode}:\n{started.text()}"
            )
            assert time.monotonic() < deadline, f"line {command.line}: never started"
            time.sleep(0.1)

    def _wait_for(self, command: Command) -> None:
        text = command.wait_for or ""
        deadline = time.monotonic() + TIMEOUT
        while not any(text in b.text(b.mark) for b in self._background):
            assert time.monotonic() < deadline, (
                f"line {command.line}: no background command printed {command.wait_for!r}"
                f"{self.background_output()}"
            )
            time.sleep(0.1)

    def background_output(self) -> str:
        return "".join(
            f"\n--- line {b.command.line} (background): `{b.command.text}`\n{b.text()}"
            for b in self._stopped + self._background
        )

    def finish(self) -> None:
        """The document's commands are done: stop the background ones, check their output."""
        self.stop()

    def stop(self, *, check: bool = True) -> None:
        """Stop the background commands (SIGTERM), as a reader's Ctrl-C would."""
        for running in self._background:
            if running.proc.poll() is None:
                os.killpg(running.proc.pid, signal.SIGTERM)
        for running in self._background:
            try:
                running.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(running.proc.pid, signal.SIGKILL)
                running.proc.wait()
        stopped, self._background = self._background, []
        self._stopped += stopped
        for each in stopped if check else []:
            printed = self._as_shown(each.text())
            # What it shows is what it printed until it was stopped: then comes its shutdown.
            assert not each.command.output or output_matches(
                each.command.output.rstrip("\n") + "...", printed
            ), (
                f"line {each.command.line}: `{each.command.text}` printed what the page does "
                f"not show.\n--- the page shows:\n{each.command.output}--- it printed:\n{printed}"
            )

    def close(self) -> None:
        self.stop(check=False)


def _answers(port: int) -> bool:
    with suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@contextmanager
def session(cwd: Path, places: Mapping[str, str]) -> Iterator[Session]:
    running = Session(cwd, places)
    try:
        yield running
    finally:
        running.close()
