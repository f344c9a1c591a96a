"""The measurements behind three design choices whose docstrings say "it costs less".

The code keeps the reason for each choice; the figures live in ``bench/README.md`` and come
from this script, so they can be checked again on another machine or after an upgrade:

- ``logs/chain.py`` writes log timestamps with its own processor instead of structlog's
  ``TimeStamper(fmt="iso", utc=True)``;
- ``runtime/dispatcher.py`` starts the run's span with ``start_span`` and
  ``context.attach``/``detach`` instead of ``start_as_current_span``;
- ``_reaper.py`` watches commands from a helper process instead of giving each command a
  ``preexec_fn`` (which makes every spawn a full ``fork()`` of the driver).

Each figure is the best of several repeats (the least disturbed by other processes).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from conveyor_driver.logs.chain import _UtcTimestamper, build_logger

REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))


def per_call(fn: Callable[[], object], n: int) -> float:
    """Best-of-REPEATS seconds per call of ``fn``."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - started) / n)
    return best


def timestamps() -> None:
    standard = structlog.processors.TimeStamper(fmt="iso", utc=True)
    ours = _UtcTimestamper()
    with open(os.devnull, "w") as devnull:
        log = build_logger(level="info", fmt="json", stream=devnull).bind(run_id="r")
        n = 50_000
        t_standard = per_call(lambda: standard(None, "info", {}), n)
        t_ours = per_call(lambda: ours(None, "info", {}), n)
        t_call = per_call(lambda: log.info("line", key=1), n)
    with_standard = t_call - t_ours + t_standard
    print("log timestamps (logs/chain.py)")
    print(f"  structlog TimeStamper(fmt='iso', utc=True) {t_standard * 1e6:7.2f} µs/line")
    print(f"  _UtcTimestamper                            {t_ours * 1e6:7.2f} µs/line")
    print(f"  a log call (JSON to /dev/null)             {t_call * 1e6:7.2f} µs")
    print(f"  structlog's stamper would be {t_standard / with_standard:.0%} of that call")


def spans() -> None:
    tracer = TracerProvider().get_tracer("bench")  # every span recorded, none exported

    def context_manager() -> None:
        with tracer.start_as_current_span("process"):
            pass

    def attach_detach() -> None:
        span = tracer.start_span("process")
        token = otel_context.attach(trace.set_span_in_context(span))
        otel_context.detach(token)
        span.end()

    n = 20_000
    t_cm = per_call(context_manager, n)
    t_plain = per_call(attach_detach, n)
    print("a run's span (runtime/dispatcher.py), SDK installed, span recorded")
    print(f"  start_as_current_span                      {t_cm * 1e6:7.2f} µs/span")
    print(f"  start_span + attach/detach                 {t_plain * 1e6:7.2f} µs/span")
    print(f"  the context manager adds {t_cm / t_plain - 1:.0%}")


async def _spawn(preexec: bool) -> None:
    options: dict[str, object] = {"start_new_session": True}
    if preexec:
        options["preexec_fn"] = lambda: None
    process = await asyncio.create_subprocess_exec("true", **options)  # type: ignore[arg-type]
    await process.wait()


def spawns() -> None:
    # A driver's memory makes fork() slower; hold about what a small driver holds.
    ballast = bytearray(50 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    n = 40

    def run(preexec: bool) -> float:
        return per_call(lambda: asyncio.run(_spawn(preexec)), n)

    t_plain, t_preexec = run(False), run(True)
    print(f"spawning a command (_reaper.py), {len(ballast) >> 20} MB of ballast held")
    print(f"  no preexec_fn (posix_spawn/vfork)          {t_plain * 1e3:7.2f} ms/command")
    print(f"  with preexec_fn (full fork)                {t_preexec * 1e3:7.2f} ms/command")
    print(f"  preexec_fn makes a spawn {t_preexec / t_plain:.1f} times as slow")
    del ballast


def main() -> None:
    timestamps()
    spans()
    spawns()


if __name__ == "__main__":
    main()
