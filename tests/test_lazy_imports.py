"""Start-up stays cheap: heavy libraries are imported by the code that needs them, not before.

``import conveyor_driver`` (defining a driver, testing its handlers) needs no NATS client
and no HTTP client; a driver without a TLS identity never needs ``cryptography``. A
top-level import added anywhere on those paths brings the cost back without failing any
other test, so a fresh interpreter says what it loaded (``make bench`` times it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.process

_HEAVY = ("nats", "aiohttp", "cryptography", "opentelemetry.sdk")


def _loaded_after(imports: str) -> list[str]:
    code = (
        f"import sys; import {imports}; print(' '.join(m for m in {_HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_import_conveyor_driver_loads_no_client_library() -> None:
    assert _loaded_after("conveyor_driver") == []


def test_what_conveyor_driver_run_loads_leaves_out_tls_and_the_sdk() -> None:
    loaded = _loaded_after("conveyor_driver.cli, conveyor_driver.runtime.server")
    assert loaded == ["nats", "aiohttp"]
