"""Kill the process groups of running ``ctx.run`` commands when the driver dies, even by SIGKILL.

Why this exists: ``ctx.run`` (:mod:`conveyor_driver.process`) starts each command in a
process group of its own, so that a timeout or a cancelled handler can kill the command and
everything it started. The same separation means nothing stops a command when the driver
itself is killed with ``kill -9`` (or by the OOM killer): no handler runs, and the commands
carry on, orphaned. ``PR_SET_PDEATHSIG`` does not answer it: it is set per process (it
would reach the shell but not the ``sleep`` or ``make`` it started), it fires when the
*thread* that forked exits, and setting it needs a ``preexec_fn``, which turns every spawn
into a full ``fork()`` of the driver (several times the cost of a short command: see
``bench/README.md``) and is documented as unsafe in a process with threads.

How: on the first ``ctx.run`` the driver starts one small helper, this file run as a script
by the same Python (``-I -S``: no site, nothing of the driver imported, so it starts in
milliseconds and holds little memory). The helper reads ``+PGID`` / ``-PGID`` lines on its
stdin, the read end of a pipe whose only write end the driver holds. While a command runs
its group is registered. When the driver dies, however it dies, the kernel closes the write
end; the helper reads EOF and sends SIGKILL to every group still registered, then exits.
A driver that exits normally also closes the pipe; its commands have ended by then.

What keeps EOF honest: the write end is opened close-on-exec, as Python opens every
descriptor, so commands never inherit it; and a child made by a plain ``os.fork`` (no exec)
closes its copy at once (``os.register_at_fork``), or it would hold the pipe open.

Limits, by choice:
- Linux only. Elsewhere a command's process group outlives a killed driver.
- A group is registered just after ``asyncio`` has started the command, a few event-loop
  turns after the fork. A driver killed within that window leaves that one command
  behind (the price of not forking the driver for every command, see above).
- A group is unregistered when ``ctx.run`` returns: what a finished command left running
  in the background was never waited for, and is left alone.
- If the helper is killed on its own, the next registration notices the broken pipe,
  starts a new helper and registers again every group still running.
- The helper handle is one per process, held in this module: "the driver died" is a fact
  about a process, so per-process state is the truth here, not a convenience.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading

_ENABLED = sys.platform.startswith("linux")
_HELPER_EXIT_WAIT = 1.0


class Reaper:
    """The driver's end: starts the helper on first use and tells it which groups run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._write_fd: int | None = None
        self._helper: subprocess.Popen[bytes] | None = None

    def register(self, pgid: int) -> None:
        """Kill ``pgid`` if this process dies before :meth:`unregister`."""
        if not _ENABLED:
            return
        with self._lock:
            self._groups.add(pgid)
            self._send(b"+%d\n" % pgid)

    def unregister(self, pgid: int) -> None:
        if not _ENABLED:
            return
        with self._lock:
            self._groups.discard(pgid)
            if self._write_fd is not None:
                self._send(b"-%d\n" % pgid)

    def close(self) -> None:
        """Close the pipe and let the helper exit: it kills the groups still registered."""
        with self._lock:
            self._stop()
            self._groups.clear()

    def _send(self, line: bytes) -> None:
        # One short write to a pipe is atomic, and the helper drains it continuously.
        if self._write_fd is not None:
            try:
                os.write(self._write_fd, line)
                return
            except OSError:  # the helper is gone: start another and tell it everything
                self._stop()
        self._start()
        if self._write_fd is not None:
            payload = b"".join(b"+%d\n" % pgid for pgid in self._groups)
            with contextlib.suppress(OSError):
                os.write(self._write_fd, payload)

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()  # both close-on-exec: no command inherits them
        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,  # holding the driver's output open would delay
                stderr=subprocess.DEVNULL,  # the EOF that whoever reads it waits for
                close_fds=True,
                start_new_session=True,  # a signal to the driver's group must not reach it
            )
        except OSError:
            os.close(write_fd)
        else:
            self._write_fd = write_fd
        finally:
            os.close(read_fd)

    def _stop(self) -> None:
        write_fd, self._write_fd = self._write_fd, None
        if write_fd is not None:
            os.close(write_fd)
        helper, self._helper = self._helper, None
        if helper is not None:
            # It exits at EOF within milliseconds; a stuck one is left for init to reap.
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(_HELPER_EXIT_WAIT)

    def _forget_in_child(self) -> None:
        """After ``os.fork``: drop the parent's pipe so that EOF still means its death."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        if self._write_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._write_fd)
        if self._helper is not None:
            self._helper.returncode = 0  # the parent's child: not this process's to wait for
        self._write_fd, self._helper = None, None
        self._groups = set()


#: The process's one reaper, used by ``ctx.run``.
REAPER = Reaper()
if _ENABLED:
    os.register_at_fork(after_in_child=REAPER._forget_in_child)
    # A normal exit closes the pipe too; doing it here lets the helper be waited for.
    atexit.register(REAPER.close)


def _serve() -> None:
    """The helper: record groups from stdin; at EOF, kill those still registered."""
    groups: set[int] = set()
    pending = b""
    while chunk := os.read(0, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                pgid = int(line[1:])
                if line.startswith(b"+"):
                    groups.add(pgid)
                else:
                    groups.discard(pgid)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    _serve()
