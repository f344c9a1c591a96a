"""Log benchmark: what one ``ctx.log.info`` costs a handler, and how fast Loki is fed.

Both figures are taken in one run beside a baseline, so the ratio holds on a noisy machine:

* the cost of one call on a run logger with the NATS and Loki sinks on (µs per call; the
  shippers run between timed chunks, as they would between a handler's awaits), against a
  plain structlog call rendering to the console (the same renderer, no sinks);
* lines per second delivered to a Loki receiver in another process in a sustained run;
* what masking secrets adds to a call (issue 13): the same logger with a redactor holding
  20 secrets against one without, on the call above and on a unique command-output line
  (what ``ctx.run`` logs), and the redactor with no secret registered (URL passwords
  only, the default; and with those off too).

Targets from issue 3: under 20 µs per call, at least 50,000 lines/s delivered. Issue 13:
masking costs at most 3 µs per call with 20 secrets.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

import aiohttp
import structlog

from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.logs.loki import LokiConfig, LokiSink
from conveyor_driver.logs.nats import NatsLogSink
from conveyor_driver.logs.redact import Redactor
from conveyor_driver.runtime.connection import connect
from conveyor_driver.runtime.publisher import Publisher

CALLS = int(os.environ.get("BENCH_LOG_CALLS", "20000"))
LINES = int(os.environ.get("BENCH_LOG_LINES", "200000"))
ROUNDS = 3
CHUNK = 500
RUN_KEYS = {
    "run_id": "0b7e0c52-6a53-4d4c-9d0e-2f8c1d7c9a11",
    "message_id": "4f1d2e8a-1c2b-4a5d-8e7f-6a5b4c3d2e1f",
    "event_name": "create",
    "resource_type": "pipeline",
    "resource_name": "my-app",
    "pipeline": "build",
}


async def per_call_us(log: structlog.typing.FilteringBoundLogger) -> float:
    """Median µs per call over chunks, yielding between chunks so the shippers keep up."""
    samples = []
    for start in range(0, CALLS, CHUNK):
        began = time.perf_counter_ns()
        for i in range(start, start + CHUNK):
            log.info("step finished", step=i, repo="https://example.org/app.git")
        samples.append((time.perf_counter_ns() - began) / CHUNK / 1000)
        await asyncio.sleep(0)
    return statistics.median(samples)


async def per_output_line_us(log: structlog.typing.FilteringBoundLogger) -> float:
    """As :func:`per_call_us`, for a line of command output: new text every call."""
    samples = []
    for start in range(0, CALLS, CHUNK):
        lines = [
            f"[{i:05d}] Compiling src/app/Module{i}.java with -Xlint:all"
            for i in range(start, start + CHUNK)
        ]
        began = time.perf_counter_ns()
        for line in lines:
            log.info(line, stream="stdout")
        samples.append((time.perf_counter_ns() - began) / CHUNK / 1000)
        await asyncio.sleep(0)
    return statistics.median(samples)


#: Registered secrets for the redaction figures: tokens of 8 to 46 characters.
SECRETS = [secrets.token_urlsafe(n) for n in range(6, 46, 2)]


async def redaction_us(
    sinks: list[NatsLogSink | LokiSink], devnull: TextIO
) -> dict[str, tuple[float, float]]:
    """µs per call with a redactor (20 secrets; none) and without, on the same sinks.

    Each round times the loggers one after the other, so a difference is not the load of
    the neighbours moving between them. Returns ``{figure: (without, with)}``.
    """
    assert len(SECRETS) == 20

    def logger(redactor: Redactor | None) -> structlog.typing.FilteringBoundLogger:
        return build_logger(fmt="json", stream=devnull, sinks=sinks, redactor=redactor).bind(
            driver="bench", **RUN_KEYS
        )

    plain, masked = logger(None), logger(Redactor(SECRETS))
    urls, empty = logger(Redactor()), logger(Redactor(urls=False))
    figures: dict[str, tuple[list[float], list[float]]] = {
        "call": ([], []),
        "output": ([], []),
        "urls": ([], []),
        "empty": ([], []),
    }
    for _ in range(ROUNDS):
        figures["call"][0].append(await per_call_us(plain))
        figures["call"][1].append(await per_call_us(masked))
        figures["output"][0].append(await per_output_line_us(plain))
        figures["output"][1].append(await per_output_line_us(masked))
        figures["urls"][0].append(await per_output_line_us(plain))
        figures["urls"][1].append(await per_output_line_us(urls))
        figures["empty"][0].append(await per_call_us(plain))
        figures["empty"][1].append(await per_call_us(empty))
    return {
        name: (statistics.median(without), statistics.median(with_))
        for name, (without, with_) in figures.items()
    }


async def delivered(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/count") as response:
        return int(await response.text())


async def main(devnull: TextIO) -> None:
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_loki_counter.py")), str(port)]
    )
    try:
        async with EmbeddedNats() as server, aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    await delivered(session, port)
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            baseline_log = build_logger(fmt="json", stream=devnull).bind(**RUN_KEYS)
            nats_sink = NatsLogSink("bench", max_queue=LINES * 2)
            loki_sink = LokiSink(
                LokiConfig(url=f"http://127.0.0.1:{port}", max_queue=LINES * 2),
                service_name="bench",
                console=build_logger(stream=devnull),
            )
            log = build_logger(fmt="json", stream=devnull, sinks=[nats_sink, loki_sink]).bind(
                driver="bench", **RUN_KEYS
            )
            nc = await connect([server.url], name="bench", log=baseline_log)
            nats_sink.start(Publisher(nc))
            loki_sink.start()

            base, full = [], []
            for _ in range(ROUNDS):
                base.append(await per_call_us(baseline_log))
                full.append(await per_call_us(log))
            base_us, full_us = statistics.median(base), statistics.median(full)
            redaction = await redaction_us([nats_sink, loki_sink], devnull)

            await _settle(session, port, ROUNDS * CALLS * 9, nats_sink)
            both = await sustained(log, session, port, nats_sink)
            await loki_sink.close()
            await nats_sink.close(timeout=60)
            await nc.close()

            loki_only_sink = LokiSink(
                LokiConfig(url=f"http://127.0.0.1:{port}", max_queue=LINES * 2),
                service_name="bench",
                console=build_logger(stream=devnull),
            )
            loki_only = build_logger(fmt="json", stream=devnull, sinks=[loki_only_sink]).bind(
                driver="bench", **RUN_KEYS
            )
            loki_only_sink.start()
            alone = await sustained(loki_only, session, port)
            await loki_only_sink.close()
    finally:
        receiver.terminate()
        receiver.wait()
    print("log benchmark (JSON console renderer to /dev/null in both)")
    print(f"  plain structlog call (baseline):      {base_us:7.2f} µs/call")
    print(
        f"  ctx.log.info with NATS + Loki sinks:  {full_us:7.2f} µs/call"
        f"   ratio {full_us / base_us:.2f}x   target < 20 µs: {'ok' if full_us < 20 else 'MISSED'}"
    )
    print(
        f"  sustained, {LINES} lines logged as fast as a handler can (baseline: "
        f"{1e6 / base_us:,.0f} plain calls/s):"
    )
    for label, (got, elapsed, *_) in (("console + NATS + Loki", both), ("console + Loki", alone)):
        rate = got / elapsed
        print(
            f"    {label:22} {got}/{LINES} delivered to Loki in {elapsed:5.2f} s: "
            f"{rate:8,.0f} lines/s   target >= 50,000: {'ok' if rate >= 50_000 else 'MISSED'}"
        )
    _, _, acked, nats_elapsed = both
    print(
        f"    NATS sink in the same run: {acked}/{LINES} acknowledged when Loki had all; "
        f"all in {nats_elapsed:5.2f} s: {LINES / nats_elapsed:8,.0f} lines/s"
    )
    print("  masking secrets (the call above with NATS + Loki sinks, without and with a redactor):")
    for name, label in (
        ("call", "20 secrets, the call above"),
        ("output", "20 secrets, a new output line"),
        ("urls", "no secret (URLs), output line"),
        ("empty", "no secret, --no-redact-urls"),
    ):
        without, with_ = redaction[name]
        cost = with_ - without
        print(
            f"    {label:30} {without:6.2f} -> {with_:6.2f} µs/call: +{cost:5.2f} µs"
            f"   target <= 3 µs: {'ok' if cost <= 3 else 'MISSED'}"
        )


async def sustained(
    log: structlog.typing.FilteringBoundLogger,
    session: aiohttp.ClientSession,
    port: int,
    nats_sink: NatsLogSink | None = None,
) -> tuple[int, float, int, float]:
    """Log LINES lines, yielding between chunks; time until the receiver has them all.

    With a NATS sink, also count its acknowledged lines when Loki is done and time until
    NATS has them all: a sink that lags behind would otherwise look free.
    """
    already = await delivered(session, port)
    acked_before = nats_sink.sent if nats_sink is not None else 0
    began = time.perf_counter()
    for start in range(0, LINES, CHUNK):
        for i in range(start, start + CHUNK):
            log.info("output line", stream="stdout", line=i)
        await asyncio.sleep(0)
    while time.perf_counter() - began < 120:
        if await delivered(session, port) >= already + LINES:
            break
        await asyncio.sleep(0.01)
    got, elapsed = await delivered(session, port) - already, time.perf_counter() - began
    if nats_sink is None:
        return got, elapsed, 0, 0.0
    acked_with_loki = nats_sink.sent - acked_before
    while time.perf_counter() - began < 120:
        if nats_sink.sent - acked_before >= LINES:
            break
        await asyncio.sleep(0.01)
    return got, elapsed, acked_with_loki, time.perf_counter() - began


async def _settle(
    session: aiohttp.ClientSession, port: int, expected: int, nats_sink: NatsLogSink
) -> None:
    """Wait until the per-call phase's lines have arrived, so they do not count later."""
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        if await delivered(session, port) >= expected and nats_sink.sent >= expected:
            return
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    with Path(os.devnull).open("w") as sink:
        asyncio.run(main(sink))
