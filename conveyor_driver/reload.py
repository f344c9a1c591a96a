"""``conveyor-driver run APP --reload``: the dev loop, the driver restarted when its code changes.

Reloading is the ``--workers`` supervisor (:mod:`.runtime.supervisor`) with one worker and
a watcher beside it, so a reload is the same graceful stop a SIGTERM starts, and nothing
new has to be trusted:

- **Graceful.** The worker is asked to stop, lets its running handlers finish within the
  driver's ``grace_period``, and exits; then the new one starts. Messages that arrive
  meanwhile wait in the durable consumer and are run by the new code, never by the old.
- **The server survives.** With ``--embedded`` the nats-server runs in the supervising
  process, so its streams, and the events in them, outlive every reload.
- **Broken code never replaces working code.** Before the running worker is stopped, a
  child Python imports the app as a worker would. If that fails (a syntax error, an
  import-time exception, a driver with no handler), one line says where and the old worker
  serves on until the next change. A check in a child rather than in this process: an
  import here would run against modules cached from the last one.

What is watched: the directory of ``path/to/app.py``, or the top-level package of
``module:attr`` (the module's directory for a plain module), recursively; ``*.py`` files
only, outside ``__pycache__``, virtual environments and hidden directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AppLoadError, ConfigurationError

if TYPE_CHECKING:
    from .app import Driver
    from .runtime.supervisor import Supervisor
    from .settings import Settings

#: Directory names never watched, besides hidden ones (``.venv``, ``.git``...).
IGNORED_DIRS = frozenset({"__pycache__", "venv", "node_modules", "site-packages", "build"})
#: How long the import check may take before the change counts as broken.
CHECK_TIMEOUT = 60.0
_PACKAGE = Path(__file__).resolve().parent


def serve_reloading(driver: Driver, app: str, settings: Settings, given: Mapping[str, str]) -> int:
    """Serve ``driver`` from ``app`` in one worker, restarted when the app's files change."""
    if settings.workers > 1:
        raise ConfigurationError(
            "--reload runs one worker, restarted on each change: it does not combine with "
            f"--workers {settings.workers}"
        )
    if importlib.util.find_spec("watchfiles") is None:
        raise ConfigurationError(
            "--reload needs the watchfiles package: pip install 'conveyor-driver[reload]'"
        )
    from .runtime.supervisor import supervise

    roots = watched_roots(app)

    async def watch(supervisor: Supervisor) -> None:
        await _watch(supervisor, roots)

    return supervise(driver, app, settings, given, companion=watch)


def watched_roots(app: str) -> list[Path]:
    """The directories whose ``.py`` files make up ``app`` (already imported by the loader)."""
    target, _, attribute = app.rpartition(":")
    if not target or not attribute.isidentifier():
        target = app
    if target.endswith(".py") or os.sep in target or "/" in target:
        return [Path(target).resolve().parent]
    top = sys.modules.get(target.split(".")[0])
    if top is not None and getattr(top, "__path__", None):
        return [Path(entry).resolve() for entry in top.__path__]
    if top is not None and getattr(top, "__file__", None):
        return [Path(str(top.__file__)).resolve().parent]
    raise ConfigurationError(f"--reload cannot tell which files make up {target!r}")


def is_app_file(path: str | Path, roots: Sequence[Path]) -> bool:
    """Whether a change to ``path`` is a change to the app's code."""
    changed = Path(path)
    if changed.suffix != ".py":
        return False
    for root in roots:
        with contextlib.suppress(ValueError):
            parts = changed.relative_to(root).parts
            return not any(_ignored(part) for part in parts[:-1]) and not _ignored(parts[-1])
    return False


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIRS


async def _watch(supervisor: Supervisor, roots: Sequence[Path]) -> None:
    """Check and reload on each batch of changes, until the supervisor stops."""
    from watchfiles import awatch

    log = supervisor.log
    log.info("watching for changes", paths=[str(root) for root in roots])
    try:
        async for changes in awatch(
            *roots,
            watch_filter=lambda _change, path: is_app_file(path, roots),
            stop_event=supervisor.stop,
        ):
            changed = sorted({_shown(path) for _, path in changes})
            problem = await check_app(supervisor.app, supervisor.env)
            if supervisor.stop.is_set():
                return
            if problem is not None:
                log.error("reload failed", error=problem, changed=changed, serving="the old code")
                continue
            log.info("reloading", changed=changed)
            supervisor.reload()
    except Exception as exc:
        # The driver serves on; only the dev loop is lost, and the line says so.
        log.error("watching for changes failed; reloading is off", error=repr(exc))


async def check_app(app: str, env: Mapping[str, str], timeout: float = CHECK_TIMEOUT) -> str | None:
    """Import ``app`` in a child Python as a worker would; None, or the one-line reason."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        app,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        process_group=0,  # a Ctrl-C is the supervisor's to handle, as for the worker
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return f"importing {app} took longer than {timeout:g}s"
    finally:
        if proc.returncode is None:  # cancelled: the supervisor is stopping
            proc.kill()
            await proc.wait()
    if proc.returncode == 0:
        return None
    said = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    said = said or [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    return said[-1] if said else f"the import check ended with exit status {proc.returncode}"


def describe_failure(exc: BaseException) -> str:
    """``app.py:12: SyntaxError: invalid syntax``: where the app broke, and how.

    The loader wraps what the import raised; the line points at the innermost frame of the
    user's code, not at the loader's or importlib's.
    """
    cause = exc.__cause__ if isinstance(exc, AppLoadError) and exc.__cause__ else exc
    if isinstance(cause, SyntaxError) and cause.filename:
        return f"{_shown(cause.filename)}:{cause.lineno}: {type(cause).__name__}: {cause.msg}"
    if cause is exc:
        return str(exc)  # the loader's own finding (no such file, not a Driver): no line
    what = f"{type(cause).__name__}: {cause}"
    frames = [
        frame
        for frame in traceback.extract_tb(cause.__traceback__)
        if not frame.filename.startswith("<") and _PACKAGE not in Path(frame.filename).parents
    ]
    if not frames:
        return what
    return f"{_shown(frames[-1].filename)}:{frames[-1].lineno}: {what}"


def _shown(path: str) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _check(app: str) -> int:
    from .loader import load_driver

    try:
        load_driver(app).check()
    except Exception as exc:
        print(describe_failure(exc), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_check(sys.argv[1]))
