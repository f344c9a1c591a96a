"""``--loop auto|asyncio|uvloop``: which event loop serves a driver.

The choice itself (in-process), and the loop a real ``conveyor-driver run`` ends up on, as
its start-up line reports it. The rest of the runtime's tests run under uvloop too:
``make test`` repeats a runtime subset with ``pytest --event-loop uvloop``.
"""

from __future__ import annotations

import asyncio
import inspect
import sys

import pytest
from apps.harness import app, clean_env, driver_process

from conveyor_driver import Context, Driver, loops
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.errors import ConfigurationError
from conveyor_driver.testing import running

WORKER = app("worker_app.py:driver")


async def _running_loop() -> str:
    return loops.loop_name(asyncio.get_running_loop())


@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_each_choice_runs_on_its_loop_when_uvloop_is_installed(choice: str, expected: str) -> None:
    assert loops.run(_running_loop(), choice) == expected


def test_without_uvloop_auto_falls_back_to_asyncio_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` sees if missing
    assert loops.run(_running_loop(), "auto") == "asyncio"
    coroutine = _running_loop()
    with pytest.raises(ConfigurationError, match=r"--loop uvloop, but uvloop is not installed"):
        loops.run(coroutine, "uvloop")
    assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"  # no "never awaited"


@pytest.mark.process
@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, "uvloop"),
        (("--loop", "asyncio"), {}, "asyncio"),
        ((), {"CONVEYOR_LOOP": "asyncio"}, "asyncio"),
        (("--loop", "uvloop"), {"CONVEYOR_LOOP": "asyncio"}, "uvloop"),
    ],
)
async def test_conveyor_driver_run_serves_on_the_chosen_loop(
    nats_server: EmbeddedNats, args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    async with driver_process(
        WORKER,
        "--nats-url",
        nats_server.url,
        "--log-format",
        "json",
        *args,
        env=clean_env(**env),
    ) as proc:
        started = await proc.started()
    assert started["loop"] == expected, proc.output


async def test_the_suite_runs_on_the_loop_it_was_asked_for(request: pytest.FixtureRequest) -> None:
    assert await _running_loop() == request.config.getoption("event_loop")


@pytest.mark.nats
@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_a_driver_stopped_while_nats_is_away_stops_cleanly(choice: str) -> None:
    """Closing the connection writes to a dead socket, which each loop refuses its own way."""

    async def scenario() -> str:
        driver = Driver("outage")

        @driver.on("pipeline")
        async def noop(ctx: Context) -> None:
            return None

        async with EmbeddedNats() as server, running(driver, server.url, log_level="error"):
            await server.stop()
            await asyncio.sleep(1.5)  # past the first reconnect attempt
        return await _running_loop()

    assert loops.run(scenario(), choice) == choice
