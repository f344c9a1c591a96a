"""``ctx.workspace``: a scratch directory per run, made when first asked for, gone after.

CI handlers clone, build and unpack. Each run gets a directory of its own so that two runs
never see each other's files, and the driver's disk does not fill up run after run. It is
made lazily: a run that never touches ``ctx.workspace`` costs no file system call.

Layout: ``<root>/conveyor-ws-<driver>-<pid>-<random>/`` holds ``owner.json`` (which process
made it) and ``work/``, the directory a handler gets, empty so that ``git clone URL .``
works in it. The owner file lets a restarted driver find what a killed one left behind
(:func:`sweep`): a process killed with SIGKILL cleans nothing up.

When the run ends the directory is removed (in a thread: a ``node_modules`` can take
seconds), or kept when the run failed and ``--keep-failed-workspaces`` is given, the run's
log saying where. A sync handler abandoned at its deadline is still running in its thread,
in that directory: its workspace is removed when that thread returns, not under its feet;
if the driver exits first, the next start's sweep removes it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from structlog.typing import FilteringBoundLogger

_PREFIX = "conveyor-ws-"
_OWNER = "owner.json"
_WORK = "work"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
#: Seconds after which a workspace whose owner cannot be checked (another host's, one
#: without an owner file) counts as stale. A live process's own workspaces are never
#: swept, whatever their age.
STALE_AFTER = 24 * 3600.0


def default_root() -> Path:
    """The system's temporary directory (``TMPDIR``...), where workspaces go by default."""
    return Path(tempfile.gettempdir())


class RunWorkspace:
    """One run's workspace: nothing on disk until :meth:`path` is first called.

    Thread-safe: a sync handler asks for it from its thread. Once the run has ended
    (:meth:`end`) it refuses to make one: a run that has ended has no workspace.
    """

    __slots__ = ("_closed", "_lock", "_orphaned", "_top", "_users", "driver", "root")

    def __init__(self, root: Path | None, driver: str) -> None:
        self.root = root
        self.driver = driver
        self._lock = threading.Lock()
        self._top: Path | None = None
        self._closed = False
        self._users = 0  # threads running a sync handler of this run, which cannot be stopped
        self._orphaned = False

    @property
    def created(self) -> Path | None:
        """The work directory if it exists, else None (asking for it here makes nothing)."""
        top = self._top
        return top / _WORK if top is not None else None

    def path(self) -> Path:
        """The work directory, made (with its parents and owner file) on the first call."""
        with self._lock:
            if self._top is None:
                if self._closed:
                    raise RuntimeError("this run has ended: its workspace is gone")
                # Made under the lock: a run that ends meanwhile (an abandoned thread)
                # then either knows of the directory or never gets one.
                self._top = _make(
                    self.root if self.root is not None else default_root(), self.driver
                )
            return self._top / _WORK

    def remove(self) -> None:
        """Delete the workspace, if it was made; read-only files and dirs included."""
        with self._lock:
            self._closed = True
            top, self._top = self._top, None
        if top is not None:
            rmtree(top)

    def enter(self) -> None:
        """A thread starts working in this run (a sync handler): see :meth:`leave`."""
        with self._lock:
            self._users += 1

    def leave(self) -> None:
        """That thread is done: the last one out removes a workspace the run left to it."""
        with self._lock:
            self._users -= 1
            last = self._users == 0 and self._orphaned
        if last:
            self.remove()

    def end(self, *, keep: bool) -> Ending | None:
        """The run is over: what becomes of its workspace (None: it never made one)."""
        with self._lock:
            self._closed = True
            if self._top is None:
                return None
            where = self._top / _WORK
            if keep:
                return Ending(where, KEPT)
            if self._users:
                self._orphaned = True
                return Ending(where, LEFT_TO_THREAD)
            return Ending(where, REMOVE)


KEPT, LEFT_TO_THREAD, REMOVE = "kept", "left to its thread", "remove"


class Ending(NamedTuple):
    """What :meth:`RunWorkspace.end` leaves :func:`finish` to do, outside its lock."""

    where: Path
    what: str


async def finish(workspace: RunWorkspace, ending: Ending, log: FilteringBoundLogger) -> None:
    """Remove, keep or leave the workspace of a run that has ended, and log it."""
    where = str(ending.where)
    if ending.what == KEPT:
        log.warning("workspace kept: the run failed", workspace=where)
    elif ending.what == LEFT_TO_THREAD:
        log.info("workspace removed when the abandoned handler returns", workspace=where)
    else:
        # Shielded: a second cancellation must not leave the directory half deleted.
        await asyncio.shield(asyncio.to_thread(workspace.remove))
        log.debug("workspace removed", workspace=where)


def _make(root: Path, driver: str) -> Path:
    root = root.absolute()  # ctx.workspace stays valid whatever directory a handler is in
    root.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix=f"{_prefix(driver)}{os.getpid()}-", dir=root))
    owner = {
        "driver": driver,
        "pid": os.getpid(),
        "started": _start_time(os.getpid()),
        "host": socket.gethostname(),
    }
    (top / _OWNER).write_text(json.dumps(owner))
    (top / _WORK).mkdir()
    return top


def _prefix(driver: str) -> str:
    return f"{_PREFIX}{_UNSAFE.sub('_', driver)}-"


def sweep(
    root: Path | None, driver: str, *, stale_after: float = STALE_AFTER
) -> tuple[list[Path], list[str]]:
    """Remove the workspaces of ``driver`` that a killed process left in ``root``.

    Only directories of this driver (by name and owner file) and of this user are looked
    at. One is removed when its process is gone (on this host: the pid is not running, or
    is running a different process since it was started), or, when that cannot be known
    (another host's, no owner file), when it is older than ``stale_after`` seconds.
    Returns what was removed, and what could not be (one line each): a directory that
    resists is left for the next start rather than stopping this one.
    """
    root = root if root is not None else default_root()
    prefix = _prefix(driver)
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return [], []
    removed: list[Path] = []
    failed: list[str] = []
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        top = Path(entry.path)
        if _stale(top, driver, old=now - info.st_mtime > stale_after):
            try:
                rmtree(top)
            except OSError as exc:
                failed.append(f"{top}: {exc}")
            else:
                removed.append(top)
    return removed, failed


def _stale(top: Path, driver: str, *, old: bool) -> bool:
    try:
        owner = json.loads((top / _OWNER).read_text())
        pid, started, host, name = owner["pid"], owner["started"], owner["host"], owner["driver"]
    except (OSError, ValueError, KeyError, TypeError):
        return old  # being made right now, or not ours to judge: only age tells
    if name != driver:
        return False  # another driver whose name sanitises to the same prefix
    if host != socket.gethostname():
        return old
    return not _alive(pid, started)


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if not sys.platform.startswith("linux"):
        return True
    now = _start_time(pid)
    # A zombie has no start time worth trusting, and a reused pid has another one.
    return now is not None and (started is None or now == started)


def _start_time(pid: int) -> str | None:
    """The process's start time in ticks since boot (Linux), which tells a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if not fields or fields[0] == "Z":
        return None
    return fields[19]


def rmtree(top: Path) -> None:
    """``shutil.rmtree`` that also deletes what a build made read-only (Go's module cache)."""

    def retry(function: Callable[..., Any], name: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EACCES:
            parent = os.path.dirname(name)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, stat.S_IRWXU)
                rmtree(Path(name))
            else:
                function(name)
            return
        raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(top, onexc=retry)
    else:
        shutil.rmtree(top, onerror=lambda function, name, info: retry(function, name, info[1]))
