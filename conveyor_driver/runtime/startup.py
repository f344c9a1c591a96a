"""Start-up steps that wait out JetStream's weather, and fail clearly when it is not weather.

A driver is often started while NATS is not quite there: pods come up before the NATS
StatefulSet, a rolling upgrade restarts nodes, a cluster elects new stream and consumer
leaders for a few seconds. Exiting then turns normal weather into a crash loop. So each
start-up step (connect, create the consumer, open the run ledger) is retried with capped
backoff until ``startup_timeout``; each kind of wait is logged once, and the error that
ends start-up names what was waited for. A configuration mistake (JetStream switched off,
a request the server refuses outright) is not weather: it ends start-up at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from nats.errors import Error as NatsError
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError
from structlog.typing import FilteringBoundLogger

from .. import protocol
from ..errors import ConsumerSetupError, ConveyorDriverError, StreamMissingError

if TYPE_CHECKING:
    from nats.aio.client import Client

T = TypeVar("T")

_FIRST_DELAY = 0.25
_MAX_DELAY = 2.0
#: JetStream's "not enabled" answers: a server or account set up without it.
_NOT_ENABLED = frozenset({10039, 10076})
#: Answers a cluster gives while it lacks a quorum, a leader or peers: they pass. Other
#: 5xx answers with a code of their own (a push consumer of that name, say) do not.
_PASSING = frozenset({10005, 10008, 10009, 10041, 10118, 10119})


class _Weather(Exception):
    """A failure that passes; ``final`` is what start-up says if it outlasts the timeout."""

    def __init__(self, kind: str, final: ConveyorDriverError) -> None:
        super().__init__(kind)
        self.kind = kind
        self.final = final


async def until_ready(
    step: Callable[[], Awaitable[T]],
    what: str,
    *,
    nc: Client,
    deadline: float,
    log: FilteringBoundLogger,
) -> T:
    """Run ``step`` until it succeeds, waiting out weather until ``deadline`` (loop time).

    ``what`` names the step in errors ("create consumer 'x' on stream 'messages'").
    """
    loop = asyncio.get_running_loop()
    delay = _FIRST_DELAY
    told: set[str] = set()
    while True:
        try:
            return await step()
        except (NatsError, TimeoutError) as exc:
            weather = classify(exc, what, nc)
        if loop.time() + delay > deadline:
            raise weather.final from None
        if weather.kind not in told:
            told.add(weather.kind)
            log.warning("start-up waiting", reason=weather.kind, step=what)
        await asyncio.sleep(delay)
        delay = min(delay * 2, _MAX_DELAY)


def classify(exc: BaseException, what: str, nc: Client) -> _Weather:
    """Return the weather ``exc`` is, or raise the configuration error it means."""
    if isinstance(exc, NotFoundError) and exc.err_code in (None, 10059):
        return _Weather(
            f"stream {protocol.MESSAGES_STREAM!r} does not exist yet",
            StreamMissingError(
                f"stream {protocol.MESSAGES_STREAM!r} does not exist on this NATS server: "
                "start the Conveyor server first, or run with --embedded"
            ),
        )
    if not jetstream_enabled(nc):
        raise ConsumerSetupError(
            f"cannot {what}: JetStream is not enabled on this NATS server "
            "(start nats-server with -js, or enable it in its configuration)"
        ) from None
    if isinstance(exc, APIError) and not isinstance(exc, ServiceUnavailableError):
        if exc.err_code in _NOT_ENABLED:
            raise ConsumerSetupError(f"cannot {what}: {exc.description}") from None
        passing = exc.err_code in _PASSING or (exc.err_code is None and (exc.code or 0) >= 500)
        if not passing and exc.description:
            raise ConsumerSetupError(f"cannot {what}: {exc.description}") from None
    reason = _reason(exc)
    return _Weather(
        "JetStream is not answering (a NATS restart or a leader election?)",
        ConsumerSetupError(f"cannot {what}: JetStream did not answer in time ({reason})"),
    )


def jetstream_enabled(nc: Client) -> bool:
    """What the connected server's INFO says; nats-py keeps it only as a private field."""
    info = getattr(nc, "_server_info", None)
    return not info or bool(info.get("jetstream"))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, APIError) and exc.description:
        return exc.description
    return str(exc) or type(exc).__name__
