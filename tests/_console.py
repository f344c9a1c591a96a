"""A document's console examples, run as a reader would type them.

A console block is commands after ``$ `` (continued by a trailing ``\\``) and, between them,
what they print; ``#`` lines are the reader's notes. Its commands run one after another with
``bash``, in the directory where ``tests/_readme.py`` wrote the document's Python blocks, so
``conveyor-driver run app:driver`` finds the ``app.py`` the page showed. What a command
prints is not compared (run ids, times and ports differ from run to run): it must succeed.

What the runner arranges, so that examples written for a laptop run in the suite:

- **This environment's programs.** ``conveyor-driver``, ``python`` and ``pytest`` are the
  test's (its interpreter's directory comes first on ``PATH``).
- **A NATS with the Conveyor streams.** The reader's ``nats://localhost:4222`` is a free port
  of the test: ``CONVEYOR_NATS_URL`` and ``CONVEYOR_EMBEDDED_PORT`` point at it, and the
  literal port ``4222`` in a command is that port. A document whose commands start their own
  server (``--embedded``) gets none from the test.
- **Another terminal.** A command followed by a note saying ``another terminal`` (or ending
  with `` &``) runs in the background, until the document's commands are done; it must be a
  ``conveyor-driver run``, and the next command waits for its ``driver started`` line.
- **Installs.** ``pip install`` is not run (the test's environment has the package): each
  ``conveyor-driver[extra]`` it names must be an extra of ``pyproject.toml``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Generous: a 2-core machine shared with other test runs.
TIMEOUT = 90.0
_READY = "driver started"
_ANOTHER = re.compile(r"^#.*another terminal", re.IGNORECASE)
_EXTRAS = re.compile(r"conveyor-driver\[([^\]]+)\]")


@dataclass(frozen=True)
class Command:
    """One command of a console block, and whether it runs in the background."""

    line: int
    text: str
    background: bool = False


def commands(code: str, first_line: int = 0) -> list[Command]:
    """The commands of a console block; ``first_line``: the line of its fence."""
    found: list[Command] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            if _ANOTHER.match(lines[i]) and found:
                found[-1] = Command(found[-1].line, found[-1].text, background=True)
            i += 1
            continue
        start = i
        parts = [lines[i][2:]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        text = "\n".join(parts).strip()
        background = text.endswith(" &")
        found.append(Command(first_line + start + 1, text.removesuffix("&").strip(), background))
        i += 1
    return found


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
    words = shlex.split(command.text.replace("\\\n", " "), comments=True)
    return words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]


def environment(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["CONVEYOR_NATS_URL"] = f"nats://127.0.0.1:{port}"
    env["CONVEYOR_EMBEDDED_PORT"] = str(port)
    return env


class Session:
    """The commands of one document, in one directory, with their background commands."""

    def __init__(self, cwd: Path, port: int) -> None:
        self.cwd = cwd
        self.port = port
        self.env = environment(port)
        self._background: list[tuple[Command, subprocess.Popen[bytes], Path]] = []

    def _script(self, command: Command) -> str:
        return re.sub(r"\b4222\b", str(self.port), command.text)

    def run(self, command: Command) -> str:
        """Run ``command``; its output. A failure raises AssertionError with the output."""
        if is_install(command):
            check_install(command)
            return ""
        if command.background:
            self._start(command)
            return ""
        done = subprocess.run(
            ["bash", "-c", self._script(command)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, (
            f"line {command.line}: `{command.text}` exited {done.returncode}:\n{output}"
            f"{self.background_output()}"
        )
        return output

    def _start(self, command: Command) -> None:
        assert shlex.split(command.text)[:2] == ["conveyor-driver", "run"], (
            f"line {command.line}: only `conveyor-driver run` may run in another terminal"
        )
        log = self.cwd / f".background-{len(self._background)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {self._script(command)}"],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._background.append((command, proc, log))
        deadline = time.monotonic() + TIMEOUT
        while _READY not in log.read_text(errors="replace"):
            assert proc.poll() is None, (
                f"line {command.line}: `{command.text}` exited {proc.returncode}:\n"
                f"{log.read_text(errors='replace')}"
            )
            assert time.monotonic() < deadline, f"line {command.line}: never started"
            time.sleep(0.1)

    def background_output(self) -> str:
        return "".join(
            f"\n--- line {c.line} (background): `{c.text}`\n{log.read_text(errors='replace')}"
            for c, _, log in self._background
        )

    def close(self) -> None:
        for _, proc, _ in self._background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in self._background:
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def session(cwd: Path, port: int) -> Iterator[Session]:
    running = Session(cwd, port)
    try:
        yield running
    finally:
        running.close()
