"""Start-up: how long ``import conveyor_driver`` takes, and ``conveyor-driver run`` from exec
to consuming, on a nats-server that is already up.

- **import**: a fresh interpreter per repeat times ``import conveyor_driver`` (what defining
  a driver or testing its handlers pays).
- **exec to consuming**: one event waits in the consumer (created beforehand, as by an
  earlier run of the driver: a restart, a new replica); the clock starts just before
  ``conveyor-driver run`` is executed and stops when its result arrives, which proves the
  driver was consuming. The "driver started" line is timed too. The first launch also
  creates the run ledger's bucket and is shown apart.

Targets (issue 11): import <= 0.2 s; exec to consuming <= 0.5 s.

Environment: ``BENCH_STARTS`` launches per loop after the first (default 5).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from conveyor_driver import protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.loader import load_driver
from conveyor_driver.models import DriverMessage, Resource, encode_driver_message

STARTS = int(os.environ.get("BENCH_STARTS", "5"))
IMPORTS = 10
RUN_PATH = "conveyor_driver.cli, conveyor_driver.runtime.server, uvloop"
IMPORT_TARGET = 0.2
START_TARGET = 0.5
APP = f"{Path(__file__).resolve().parent / '_startup_app.py'}:driver"
CLI = Path(sys.executable).parent / "conveyor-driver"
TIMEOUT = 60.0


def time_import(modules: str = "conveyor_driver") -> float:
    code = f"import time; t = time.perf_counter(); import {modules}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout)


def time_interpreter() -> float:
    """An interpreter that imports nothing of ours: the floor under every start."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.monotonic() - started


async def launch(url: str, loop: str, nc: Client) -> tuple[float, float]:
    """Seconds from exec to "driver started" and to the first result."""
    run_id = str(uuid.uuid4())
    arrived: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def on_result(msg: Msg) -> None:
        if orjson.loads(msg.data).get("run_id") == run_id and not arrived.done():
            arrived.set_result(time.monotonic())

    sub = await nc.subscribe(protocol.RESULT_SUBJECT, cb=on_result)
    resource = Resource(name="app", type="pipeline", id=str(uuid.uuid4()), spec={})
    message = DriverMessage(event="create", payload=resource, run_id=run_id, id=str(uuid.uuid4()))
    await nc.jetstream().publish(
        protocol.resource_subject("pipeline"), encode_driver_message(message)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "OTEL_"))}
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(CLI),
        "run",
        APP,
        "--nats-url",
        url,
        "--loop",
        loop,
        "--log-format",
        "json",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stderr is not None
        ready: float | None = None
        while ready is None:
            line = await asyncio.wait_for(proc.stderr.readline(), TIMEOUT)
            if not line:
                raise RuntimeError(f"conveyor-driver run exited with {await proc.wait()}")
            if b'"driver started"' in line:
                ready = time.monotonic()
        result = await asyncio.wait_for(arrived, TIMEOUT)
    finally:
        await sub.unsubscribe()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    return ready - started, result - started


async def main() -> int:
    imports = sorted(time_import() for _ in range(IMPORTS))
    interpreter = statistics.median(time_interpreter() for _ in range(IMPORTS))
    print(f"start-up ({os.cpu_count()} cores)")
    print(
        f"  import conveyor_driver: {statistics.median(imports):.3f} s median of {IMPORTS}"
        f" (fastest {imports[0]:.3f} s; the bare interpreter: {interpreter:.3f} s)"
        f"  target <= {IMPORT_TARGET} s:"
        f" {'ok' if statistics.median(imports) <= IMPORT_TARGET else 'BELOW TARGET'}"
    )
    # What `conveyor-driver run` imports before it connects: most of its start-up.
    run_path = statistics.median(time_import(RUN_PATH) for _ in range(IMPORTS))
    print(f"  import of what `conveyor-driver run` loads before it connects: {run_path:.3f} s")
    driver = load_driver(APP)
    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        try:
            config = protocol.consumer_config(driver.name, driver.resource_types, driver.ack_wait)
            await nc.jetstream().add_consumer(protocol.MESSAGES_STREAM, config)
            first = await launch(server.url, "auto", nc)
            print(
                f"  the first launch (creates the run ledger's bucket): {first[1]:.3f} s"
                " from exec to the first result"
            )
            for loop in ("uvloop", "asyncio"):
                runs = [await launch(server.url, loop, nc) for _ in range(STARTS)]
                ready = statistics.median(run[0] for run in runs)
                consuming = statistics.median(run[1] for run in runs)
                spread = f"{min(r[1] for r in runs):.3f}-{max(r[1] for r in runs):.3f}"
                verdict = "ok" if consuming <= START_TARGET else "BELOW TARGET"
                print(
                    f"  conveyor-driver run --loop {loop:<7}: exec to first result"
                    f" {consuming:.3f} s ({spread}), to 'driver started' {ready:.3f} s;"
                    f" median of {STARTS}  target <= {START_TARGET} s: {verdict}"
                )
        finally:
            await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
