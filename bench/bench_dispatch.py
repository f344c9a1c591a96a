"""Dispatch throughput: the framework against the strongest hand-written nats-py loop.

Every contender runs in a process of its own (``_contender.py``) on asyncio's loop and on
uvloop, against one nats-server: the hand-written loop, the framework (ledger off, log
level warning), the framework at log level info with one ``ctx.log.info`` per run, the
framework with its run ledger, and the framework without its loop watchdog (what the
watchdog costs). Each consumes the same pre-loaded events (DriverMessages as
the Conveyor server sends them) from a durable pull consumer with the framework's
configuration, publishes one PipelineEvent per event to ``pipelines.driver.result``, awaits
its PubAck and only then acks. The handler does nothing, so what is measured is the cost
of the machinery around it.

A run starts at the first delivery the contender's own code sees (it reports the moment
and its CPU time) and ends when this process, the collector, sees the consumer with
nothing pending and nothing un-acked. Per message it reports the rate and the CPU time of
the contender, of the nats-server (``/proc/<pid>/stat``) and of the collector. Contenders
take turns in an order rotated every round; the median and the spread of the rounds are
printed.

Environment:
    BENCH_N         events per run (default 5000)
    BENCH_ROUNDS    rounds; the median is reported, with the spread (default 3)
    BENCH_LOOPS     event loops to run every contender on (default ``asyncio,uvloop``)
    BENCH_PROFILE   ``1``: afterwards, profile one framework run per concurrency (cProfile,
                    in this process)
    BENCH_KINDS     contenders to run, comma-separated (default: all); the tables that
                    compare a missing one are left out
    BENCH_CONCURRENCY  concurrencies to run, comma-separated (default ``1,64``)

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
from _events import consumer_state, create_consumer, make_events, preload, reset
from _in_process import measure, profile_framework, run_framework
from nats.aio.client import Client

from conveyor_driver.embedded import EmbeddedNats

#: bench_telemetry.py runs the framework in a process of its own with these.
__all__ = ["main", "make_events", "measure", "run_framework"]

N = int(os.environ.get("BENCH_N", "5000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
LOOPS = tuple(os.environ.get("BENCH_LOOPS", "asyncio,uvloop").split(","))
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
CONCURRENCIES = tuple(int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,64").split(","))
#: Issue 11: the framework at >= 0.9 of the hand-written loop on the same event loop.
TARGET = 0.9
#: The run ledger's cost targets (issue 10): ledger on / off, by concurrency.
LEDGER_TARGETS = {1: 0.6, 64: 0.75}
#: The most the loop watchdog may cost at concurrency 64 (issue 10).
WATCHDOG_TARGET = 0.02
WARMUP_N = 300
#: How often the collector asks the consumer whether the run is over: the end is late by
#: at most this, the same way for every contender.
POLL = 0.002
POLL_SLOWEST = 0.05
RUN_TIMEOUT = 600.0
CONTENDER = Path(__file__).resolve().parent / "_contender.py"
#: In the tables' order; the kinds are _contender.KINDS.
ALL_KINDS = (
    "hand-written",
    "framework",
    "framework-logged",
    "framework-ledger",
    "framework-unwatched",
)
KINDS = tuple(
    kind
    for kind in ALL_KINDS
    if kind in os.environ.get("BENCH_KINDS", ",".join(ALL_KINDS)).split(",")
)
_TICKS = os.sysconf("SC_CLK_TCK")


def _until_next_poll(state: dict[str, object], n: int, elapsed: float) -> float:
    """Seldom while the end is far, every :data:`POLL` as it nears: the collector's load on
    the two other processes stays small, and the end is still seen within ``POLL``.
    """
    pending, unacked = state["num_pending"], state["num_ack_pending"]
    assert isinstance(pending, int) and isinstance(unacked, int)
    done = n - pending - unacked
    if done <= 0 or elapsed <= 0:
        return POLL
    seconds_left: float = (pending + unacked) * elapsed / done
    return min(max(seconds_left / 4, POLL), POLL_SLOWEST)


def _finished(state: dict[str, object], name: str, n: int) -> bool:
    if state["num_pending"] != 0 or state["num_ack_pending"] != 0:
        return False
    delivered = state["delivered"]
    assert isinstance(delivered, dict)
    if delivered["consumer_seq"] != n or state.get("num_redelivered"):
        raise RuntimeError(f"{name}: expected {n} single deliveries, got {state}")
    return True


# --- contenders in processes of their own -------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far, from ``/proc`` (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass(frozen=True)
class Sample:
    """One run of one contender: its rate, and CPU seconds per process over the run."""

    events: int
    seconds: float
    driver_cpu: float
    server_cpu: float
    collector_cpu: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def us(self, cpu: float) -> float:
        return cpu / self.events * 1e6


class Child:
    """A ``_contender.py`` process: KIND on LOOP, told what to do one line at a time."""

    def __init__(self, kind: str, loop: str, logs: Path) -> None:
        self.kind = kind
        self.loop = loop
        self.label = f"{kind}@{loop}"
        self._log = logs / f"{self.label}.log"
        self._proc: asyncio.subprocess.Process | None = None

    async def spawn(self, url: str) -> None:
        with self._log.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(CONTENDER),
                self.kind,
                self.loop,
                url,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        await self.expect("ready")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        await self._proc.stdin.drain()

    async def expect(self, *words: str, timeout: float = RUN_TIMEOUT) -> list[str]:
        """The next reply, which must start with one of ``words``."""
        assert self._proc is not None and self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.label}: no reply in {timeout}s\n{self.log_tail()}") from None
        reply = line.decode().split()
        if not reply or reply[0] not in words:
            raise RuntimeError(f"{self.label}: {line!r}, not {words}\n{self.log_tail()}")
        return reply

    def log_tail(self) -> str:
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-30:])

    async def close(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


async def run_child(
    child: Child, nc: Client, server_pid: int, name: str, concurrency: int, bodies: list[bytes]
) -> Sample:
    """One run of ``child``, then a clean server for the next."""
    js = nc.jetstream()
    n = len(bodies)
    try:
        await create_consumer(js, name)
        await preload(js, bodies)
        await child.send(f"start {name} {concurrency}")
        replies: dict[str, list[str]] = {}
        while len(replies) < 2:  # "started" and "first", in either order
            reply = await child.expect("started", "first")
            replies[reply[0]] = reply
        started, driver_cpu = float(replies["first"][1]), float(replies["first"][2])
        server_cpu = process_cpu(server_pid)
        collector_cpu = time.process_time()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RUN_TIMEOUT
        while not _finished(state := await consumer_state(nc, name), name, n):
            if loop.time() > deadline:
                raise TimeoutError(f"{child.label} {name}: not done within {RUN_TIMEOUT}s")
            await asyncio.sleep(_until_next_poll(state, n, time.monotonic() - started))
        ended = time.monotonic()
        server_cpu = process_cpu(server_pid) - server_cpu
        collector_cpu = time.process_time() - collector_cpu
        await child.send("stop")
        driver_cpu = float((await child.expect("stopped"))[1]) - driver_cpu
    except BaseException:
        with contextlib.suppress(Exception):
            await reset(js, name, n)
        raise
    await reset(js, name, n)
    return Sample(n, ended - started, driver_cpu, server_cpu, collector_cpu)


# --- orchestration -----------------------------------------------------------------------

Samples = dict[tuple[str, str, int], list[Sample]]


def _rotated(children: list[Child], by: int) -> Iterator[Child]:
    """Everyone once, starting somewhere else each round: no contender always goes first."""
    for i in range(len(children)):
        yield children[(i + by) % len(children)]


async def main() -> int:
    print(
        f"bench: {N} events per run, {ROUNDS} rounds, concurrency {CONCURRENCIES},"
        f" loops {', '.join(LOOPS)}, {os.cpu_count()} cores"
    )
    bodies = make_events(N)
    samples: Samples = {(k, loop, c): [] for k in KINDS for loop in LOOPS for c in CONCURRENCIES}
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as logs:
        children = [Child(kind, loop, Path(logs)) for loop in LOOPS for kind in KINDS]
        async with EmbeddedNats() as server:
            assert server.pid is not None
            nc = await nats.connect(server.url)
            try:
                await asyncio.gather(*(child.spawn(server.url) for child in children))
                # First runs pay for imports, cattrs' generated functions and the server's
                # first stream writes; no contender should be charged for that.
                for child in children:
                    for c in CONCURRENCIES:
                        name = f"warmup-{child.kind}-{child.loop}-c{c}"
                        await run_child(child, nc, server.pid, name, c, bodies[:WARMUP_N])
                for round_no in range(ROUNDS):
                    for c in CONCURRENCIES:
                        for child in _rotated(children, round_no):
                            name = f"{child.kind}-{child.loop}-c{c}-r{round_no}"
                            sample = await run_child(child, nc, server.pid, name, c, bodies)
                            samples[child.kind, child.loop, c].append(sample)
                            print(
                                f"  {name:<34} {sample.rate:>9,.0f} msgs/s"
                                f"  CPU us/msg: driver {sample.us(sample.driver_cpu):5.1f}"
                                f"  nats-server {sample.us(sample.server_cpu):5.1f}"
                                f"  collector {sample.us(sample.collector_cpu):4.1f}",
                                flush=True,
                            )
                if PROFILE:
                    for c in CONCURRENCIES:
                        await profile_framework(server.url, nc, c, bodies)
            finally:
                await asyncio.gather(*(child.close() for child in children))
                await nc.close()
    report(samples)
    return 0


def _median(samples: list[Sample], value: Callable[[Sample], float]) -> float:
    return statistics.median(value(sample) for sample in samples)


def _paired(samples: Samples, a: tuple[str, str, int], b: tuple[str, str, int]) -> str:
    """``a``/``b`` as the ratio of the medians, and the lowest and highest of the rounds."""
    ratio = _median(samples[a], lambda s: s.rate) / _median(samples[b], lambda s: s.rate)
    rounds = [x.rate / y.rate for x, y in zip(samples[a], samples[b], strict=True)]
    return f"{ratio:.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def report(samples: Samples) -> None:
    print(f"\nmedians of {ROUNDS} rounds of {N} events (the lowest-highest round in brackets)")
    for c in CONCURRENCIES:
        print(
            f"\nconcurrency {c:<3} {'contender':<26} {'msgs/s':>8} {'(rounds)':>17}"
            f"   CPU us/msg: {'driver':>6} {'nats-server':>11} {'collector':>9}"
            "   vs hand-written"
        )
        for loop in LOOPS:
            for kind in KINDS:
                runs = samples[kind, loop, c]
                rates = [run.rate for run in runs]
                ratio = (
                    _paired(samples, (kind, loop, c), ("hand-written", loop, c))
                    if kind != "hand-written" and "hand-written" in KINDS
                    else ""
                )
                print(
                    f"  {loop + ' ' + kind:<41} {statistics.median(rates):>8,.0f}"
                    f" {f'({min(rates):,.0f}-{max(rates):,.0f})':>17}"
                    f"               {_median(runs, lambda s: s.us(s.driver_cpu)):>6.1f}"
                    f" {_median(runs, lambda s: s.us(s.server_cpu)):>11.1f}"
                    f" {_median(runs, lambda s: s.us(s.collector_cpu)):>9.1f}   {ratio}"
                )
    if {"hand-written", "framework", "framework-logged"} <= set(KINDS):
        _report_dispatch(samples)
    if {"framework", "framework-ledger"} <= set(KINDS):
        _report_ledger(samples)
    if {"framework", "framework-unwatched"} <= set(KINDS):
        _report_watchdog(samples)
    if "asyncio" in LOOPS and "uvloop" in LOOPS:
        _report_uvloop(samples)


def _report_dispatch(samples: Samples) -> None:
    print(
        "\nissue 11, targets 1 and 2: the framework / the hand-written loop on the same loop,"
        f" >= {TARGET}"
    )
    for loop in LOOPS:
        for kind in ("framework-logged", "framework"):
            cells = []
            for c in CONCURRENCIES:
                a, b = (kind, loop, c), ("hand-written", loop, c)
                ok = _median(samples[a], lambda s: s.rate) >= TARGET * _median(
                    samples[b], lambda s: s.rate
                )
                cells.append(f"c{c} {_paired(samples, a, b)} {'ok' if ok else 'BELOW'}")
            print(f"  {loop:<8} {kind:<17} " + "   ".join(cells))


def _report_ledger(samples: Samples) -> None:
    print("\nthe run ledger's cost: framework with the ledger / without (issue 10)")
    for loop in LOOPS:
        cells = []
        for c in CONCURRENCIES:
            a, b = ("framework-ledger", loop, c), ("framework", loop, c)
            on, off = (_median(samples[x], lambda s: s.rate) for x in (a, b))
            target = LEDGER_TARGETS.get(c)
            verdict = "" if target is None else "ok" if on / off >= target else "BELOW"
            cells.append(f"c{c} {_paired(samples, a, b)} target >= {target}: {verdict}")
        print(f"  {loop:<8} " + "   ".join(cells))


def _report_watchdog(samples: Samples) -> None:
    print(
        "\nthe loop watchdog's cost: framework / framework without it (issue 10:"
        f" at most {WATCHDOG_TARGET:.0%} at concurrency 64)"
    )
    for loop in LOOPS:
        cells = []
        for c in CONCURRENCIES:
            a, b = ("framework", loop, c), ("framework-unwatched", loop, c)
            on, off = (_median(samples[x], lambda s: s.rate) for x in (a, b))
            cpu_on, cpu_off = (_median(samples[x], lambda s: s.us(s.driver_cpu)) for x in (a, b))
            verdict = ""
            if c == 64:
                verdict = " ok" if on / off >= 1 - WATCHDOG_TARGET else " BELOW (or noise)"
            cells.append(
                f"c{c} {_paired(samples, a, b)} CPU {cpu_on:.1f}/{cpu_off:.1f} us{verdict}"
            )
        print(f"  {loop:<8} " + "   ".join(cells))


def _report_uvloop(samples: Samples) -> None:
    print("\nwhat uvloop buys: each contender on uvloop / on asyncio")
    for kind in KINDS:
        cells = [
            f"c{c} {_paired(samples, (kind, 'uvloop', c), (kind, 'asyncio', c))}"
            for c in CONCURRENCIES
        ]
        print(f"  {kind:<17} " + "   ".join(cells))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
