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

# Runs the demo as `make demo` does, then names any pytest module it imported.
_DEMO_WITHOUT_PYTEST = """
import runpy, sys
status = 0
try:
    runpy.run_path(sys.argv[1], run_name="__main__")
except SystemExit as exit:
    status = exit.code
pytest = ("pytest", "_pytest", "pytest_asyncio")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in pytest)
print("pytest modules:", loaded[:3])
sys.exit(status or (1 if loaded else 0))
"""


def test_running_is_one_function_under_every_name() -> None:
    assert conveyor_driver.testing.running is serve.running
    assert fixtures.running is serve.running  # the old import path keeps working


@pytest.mark.nats
@pytest.mark.process
def test_make_demo_succeeds_and_imports_no_pytest() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _DEMO_WITHOUT_PYTEST, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pytest modules: []" in done.stdout
    assert "== 7 log entries stored on logs." in done.stdout
