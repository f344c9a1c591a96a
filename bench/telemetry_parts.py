"""Where telemetry's CPU per run goes: the dispatcher's run and the result's headers, no NATS.

Each measurement is a child process (OpenTelemetry's providers are set once per process)
that sends ``BENCH_N`` pre-encoded events through the dispatcher's ``process`` with a
no-op handler, then writes the result's trace context into headers as the
settlement does (:func:`~conveyor_driver.trace_context.inject`), and reports its CPU time per
run. Modes as in ``bench_telemetry.py``: ``off`` (no SDK), ``on`` (every span recorded,
batched spans exported nowhere, metrics in memory), ``sampled`` (10% of traces).

The parts are found by taking one out and measuring again: ``histogram`` (the duration
record replaced by nothing), ``headers`` (no inject); what is left of the difference from
``off`` is the span (its start, its context made current, its end). Each is the median of
``BENCH_ROUNDS`` children; their spread is printed. Less noisy than ``bench_telemetry.py``
(no server, no network), and without its NATS work, so the figures are smaller.

Environment:
    BENCH_N         runs per child (default 20000)
    BENCH_ROUNDS    children per mode and part (default 3)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

N = int(os.environ.get("BENCH_N", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
MODES = ("off", "on", "sampled")
WITHOUT = ("nothing", "histogram", "headers", "histogram+headers")


class _NoHistogram:
    def record(self, amount: float, attributes: object = None) -> None:
        return None


async def child(mode: str, without: str) -> None:
    if mode != "off":
        from bench_telemetry import install_sdk

        install_sdk(1.0 if mode == "on" else 0.1)
    import structlog
    from _events import make_events

    from conveyor_driver import Context, Driver, protocol
    from conveyor_driver.runtime.dispatcher import Delivery, Services, process
    from conveyor_driver.telemetry import Telemetry
    from conveyor_driver.testing.fake_api import FakeConveyorClient
    from conveyor_driver.trace_context import inject

    driver = Driver("parts", concurrency=64)

    @driver.on("pipeline")
    async def noop(ctx: Context) -> None:
        return None

    telemetry = Telemetry()
    if "histogram" in without:
        telemetry.process_duration = _NoHistogram()  # type: ignore[assignment]
        telemetry._durations = None
    headers = "headers" not in without
    log = structlog.wrap_logger(
        structlog.ReturnLogger(), wrapper_class=structlog.make_filtering_bound_logger(30)
    )
    services = Services(log=log, api=FakeConveyorClient(), telemetry=telemetry)
    subject = protocol.resource_subject("pipeline")
    deliveries = [Delivery(body, subject) for body in make_events(N)]
    started = time.process_time()
    for delivery in deliveries:
        processed = await process(driver, delivery, services)
        if headers:
            inject({"Nats-Msg-Id": "x"}, processed.span_context)
    print((time.process_time() - started) / N * 1e6)


def _run(mode: str, without: str) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, without],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    cpu: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS):
        for without in WITHOUT:
            for mode in MODES:
                cpu.setdefault((mode, without), []).append(_run(mode, without))
    median = {key: statistics.median(values) for key, values in cpu.items()}
    print(f"CPU per run, dispatcher + headers, no NATS ({N} runs, median of {ROUNDS})")
    for without in WITHOUT:
        off = median["off", without]
        cells = []
        for mode in MODES[1:]:
            values = cpu[mode, without]
            cells.append(
                f"{mode} +{median[mode, without] - off:5.1f}"
                f" ({min(values) - off:+.1f}..{max(values) - off:+.1f})"
            )
        print(f"  without {without:18} off {off:5.1f} us   " + "   ".join(cells))
    for mode in MODES[1:]:
        whole = median[mode, "nothing"] - median["off", "nothing"]
        histogram = whole - (median[mode, "histogram"] - median["off", "histogram"])
        headers = whole - (median[mode, "headers"] - median["off", "headers"])
        span = median[mode, "histogram+headers"] - median["off", "histogram+headers"]
        print(
            f"  {mode:8} added {whole:5.1f} us: span {span:5.1f}, histogram {histogram:5.1f},"
            f" headers {headers:5.1f}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        asyncio.run(child(sys.argv[2], sys.argv[3]))
    else:
        main()
