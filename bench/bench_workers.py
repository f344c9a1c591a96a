"""Workers: the throughput of a CPU-bound driver with ``--workers 2`` against one process.

One embedded nats-server. For each round, ``conveyor-driver run bench/_cpu_app.py:driver``
is started with ``--workers 1`` and with ``--workers 2`` (in alternating order), waited for
until its ``/readyz`` answers 200 (every worker consuming), and then N events are published
at once; the clock runs from the first publish until the consumer's ack floor has passed
the last of them. Each handler burns about ``BENCH_WORKERS_MS`` of pure-Python CPU in a
plain ``def`` (calibrated here first), with two handler slots per process.

On a machine with two free cores the ratio (2 workers / 1) approaches 2; the nats-server,
this script and anything else running share those cores, which is what keeps it below.

Environment:
    BENCH_WORKERS_N       events per run (default 200)
    BENCH_WORKERS_ROUNDS  rounds; medians are reported (default 3)
    BENCH_WORKERS_MS      CPU milliseconds per run (default 20)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nats
from nats.aio.client import Client

from conveyor_driver import protocol
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.models import DriverMessage, Resource, encode_driver_message

N = int(os.environ.get("BENCH_WORKERS_N", "200"))
ROUNDS = int(os.environ.get("BENCH_WORKERS_ROUNDS", "3"))
WORK_MS = float(os.environ.get("BENCH_WORKERS_MS", "20"))
APP = str(Path(__file__).resolve().parent / "_cpu_app.py:driver")
NAME = "cpu-bench"
START_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0


def calibrate() -> int:
    """Loop iterations of the handler that take about WORK_MS of CPU on this machine."""
    loops = 100_000
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        total = 0
        for i in range(loops):
            total += i * i
        best = min(best, time.process_time() - start)
    return max(1, int(loops * WORK_MS / 1000 / best))


def driver_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its children (Linux /proc)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pending += [int(child) for child in children]
    return total


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


async def one_run(nc: Client, url: str, workers: int, loops: int) -> tuple[float, float]:
    """Events per second of ``--workers workers`` over N pre-published events, and the
    cores the driver's processes used meanwhile (CPU seconds / wall seconds)."""
    port = free_port()
    # Start-up is not timed; readiness (every worker consuming) is awaited first.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor_driver",
        "run",
        APP,
        "--nats-url",
        url,
        "--workers",
        str(workers),
        "--http-port",
        str(port),
        "--log-level",
        "warning",
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not await asyncio.to_thread(_ready, port):
            if time.monotonic() > deadline or proc.returncode is not None:
                raise RuntimeError(f"--workers {workers} did not become ready")
            await asyncio.sleep(0.1)
        js = nc.jetstream()
        info = await js.consumer_info(protocol.MESSAGES_STREAM, NAME)
        target = info.ack_floor.consumer_seq + N if info.ack_floor else N
        resource = Resource("bench", "pipeline", spec={"loops": loops})
        bodies = [
            encode_driver_message(
                DriverMessage("create", resource, run_id=str(uuid.uuid4()), id=str(uuid.uuid4()))
            )
            for _ in range(N)
        ]
        cpu = driver_cpu(proc.pid)
        start = time.perf_counter()
        for body in bodies:
            await js.publish(protocol.resource_subject("pipeline"), body)
        while True:
            info = await js.consumer_info(protocol.MESSAGES_STREAM, NAME)
            if info.ack_floor is not None and info.ack_floor.consumer_seq >= target:
                break
            if time.perf_counter() - start > RUN_TIMEOUT:
                raise RuntimeError(f"--workers {workers}: not done in {RUN_TIMEOUT:g}s")
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - start
        return N / seconds, (driver_cpu(proc.pid) - cpu) / seconds
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def main() -> None:
    loops = calibrate()
    rates: dict[int, list[float]] = {1: [], 2: []}
    cores: dict[int, list[float]] = {1: [], 2: []}
    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        try:
            await one_run(nc, server.url, 1, loops)  # warm-up: creates the consumer, caches
            for round_ in range(ROUNDS):
                order = (1, 2) if round_ % 2 == 0 else (2, 1)
                for workers in order:
                    rate, used = await one_run(nc, server.url, workers, loops)
                    rates[workers].append(rate)
                    cores[workers].append(used)
        finally:
            await nc.close()
    one, two = (statistics.median(rates[k]) for k in (1, 2))
    per_round = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
    print(f"CPU-bound handler, {WORK_MS:g} ms of CPU a run, 2 handler slots per process")
    for workers, rate in ((1, one), (2, two)):
        used = statistics.median(cores[workers])
        print(f"  --workers {workers}   {rate:8.1f} runs/s   {used:4.2f} cores used by the driver")
    print(
        f"  ratio 2/1     {two / one:8.2f}  (per round {min(per_round):.2f}-{max(per_round):.2f})"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"(medians of {ROUNDS} rounds of {N} runs; nproc = {os.cpu_count()}; load {load})")


if __name__ == "__main__":
    asyncio.run(main())
