"""The suite's nats-server fixtures, and the markers that say what a test needs.

Markers (registered in pyproject.toml, where ``--strict-markers`` refuses any other):

- ``nats``: needs a nats-server. :func:`pytest_collection_modifyitems` adds it to every test
  that uses the ``nats_server`` fixture (itself or through ``nats_client``); a test that
  starts a server of its own carries ``@pytest.mark.nats`` (or its module's ``pytestmark``).
- ``process``: starts a Python child process: the ``conveyor-driver`` command, ``python``,
  a build. Always written on the test or its module. ``make test-fast`` leaves these out.
- ``slow``: builds the package into fresh venvs; minutes, not seconds.

The event loop: in-process tests run on asyncio's own loop, or on uvloop with
``pytest --event-loop uvloop`` (``make test`` runs the runtime's tests again that way). The
drivers that process tests start choose for themselves (``--loop auto``: uvloop).

Marks are checked, not hoped for: :func:`_children_match_their_markers` watches every child
a test starts, and a test that starts a nats-server or a Python without the marker that
says so fails at teardown, naming the marker to add. Other children (the shell commands of
``ctx.run`` and its reaper, ``sleep``) are what the code under test does, and need no
marker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["conveyor_driver.testing.fixtures"]

_PYTHON = {Path(sys.executable).name, "conveyor-driver", "pip"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of in-process async tests (default: asyncio)",
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if config.getoption("event_loop") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "nats_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.nats)


def _argv(args: object) -> list[str]:
    """A Popen call's arguments as file-system strings."""
    items = args if isinstance(args, Sequence) and not isinstance(args, str | bytes) else [args]
    return [os.fsdecode(a) if isinstance(a, str | bytes | os.PathLike) else str(a) for a in items]


def _marker_for(argv: list[str]) -> str | None:
    """The marker a test needs to start this child, if any."""
    program = Path(argv[0]).name if argv else ""
    if program == "nats-server":
        return "nats"
    if program in _PYTHON or program.startswith("python"):
        # ctx.run's own helper (a tiny `python -I -S` reaper) is the code under test.
        if any("reaper" in Path(arg).name for arg in argv[1:]):
            return None
        return "process"
    return None


@pytest.fixture(autouse=True)
def _children_match_their_markers(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    marked = {mark.name for mark in request.node.iter_markers()}
    unmarked: list[str] = []
    start = subprocess.Popen.__init__

    def watched(self: subprocess.Popen[Any], args: Any, *rest: Any, **options: Any) -> None:
        argv = _argv(args)
        needed = _marker_for(argv)
        if needed is not None and needed not in marked:
            unmarked.append(f"{' '.join(argv)[:80]} needs @pytest.mark.{needed}")
        start(self, args, *rest, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", watched)
    yield
    if unmarked:
        pytest.fail(f"{request.node.nodeid} starts children without their markers: {unmarked}")


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation site, built strictly once for the tests that read or browse it.

    The tests using it carry ``process`` (the build is a ``python -m mkdocs``); the build's
    own failure is the first of them failing, with mkdocs' output.
    """
    site = tmp_path_factory.mktemp("docs") / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return site
