"""The built documentation site in Debian's chromium, for the browser test and the screenshots.

Playwright drives the system's ``/usr/bin/chromium`` (``.ci/run`` installs it) rather than
a browser of its own: ``playwright install`` downloads from hosts this project's machines
cannot reach. The flags keep chromium off the network it would otherwise call at every
start (updates, sync, Google's hosts), which a closed network refuses, noisily.
The site is served over HTTP, not opened as files: Material's search loads its index with
``fetch``, which ``file://`` pages may not do.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")

# Playwright adds --headless, --no-sandbox (it launches without chromium's sandbox unless
# asked) and a fresh --user-data-dir of its own; these are the rest.
_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def unavailable() -> str | None:
    """Why the site cannot be looked at here, or ``None`` when it can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (.ci/run installs Debian's chromium package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -e '.[docs]')"
    return None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Silent: one line per request would bury the test's own output."""


@contextmanager
def serving(site: Path) -> Iterator[str]:
    """Serve ``site`` on a free local port; yields the base URL, ending in ``/``."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def launch(playwright: Playwright) -> Browser:
    """Debian's chromium, headless, off the network but for the local site."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=_FLAGS, timeout=60_000
    )
