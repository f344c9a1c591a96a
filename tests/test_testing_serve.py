"""``running`` serves a driver without pytest: scripts (``make demo``, the benchmarks) use it
with only the library installed, and the fixtures module still offers it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import conveyor_driver.testing
from conveyor_driver.testing import fixtures, serve

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_running_is_one_function_under_every_name() -> None:
    assert conveyor_driver.testing.running is serve.running
    assert fixtures.running is serve.running  # the old import path keeps working


@pytest.mark.process
def test_the_toolkit_and_the_demo_import_no_pytest() -> None:
    code = (
        "import sys, runpy\n"
        "import conveyor_driver.testing\n"
        "runpy.run_path(sys.argv[1], run_name='not_main')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest', "
        "'pytest_asyncio'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
