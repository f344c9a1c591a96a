"""What a handler's return value or exception means for the message and the pipeline.

The semantics follow kopf: a :class:`Fail` is permanent (report it, never retry), a
:class:`Retry` is temporary (try again later, report nothing yet), and any other exception
is treated as temporary until the driver's ``max_attempts`` is spent, so that no build
retries forever and none is silently dropped.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from .models import json_problem

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0


@attrs.frozen
class Result:
    """The outcome a handler reports; published to the server as the ``driverresult``."""

    success: bool
    message: str = ""
    data: Any = None

    @classmethod
    def ok(cls, message: str = "", data: Any = None) -> Result:
        return cls(True, message, data)

    @classmethod
    def fail(cls, message: str, data: Any = None) -> Result:
        return cls(False, message, data)


class Fail(Exception):
    """Raise to report a permanent failure: the result is published and nothing retries."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class Retry(Exception):
    """Raise when the work cannot be done *yet*: the message comes back after ``delay``.

    Without a delay the driver's exponential backoff applies. Retries count towards
    ``max_attempts`` like errors do.
    """

    def __init__(self, message: str = "", delay: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay = delay


class TimedOut(Exception):
    """An attempt ran past its deadline (``timeout=``): a failed attempt, retried as any."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {duration(seconds)}")
        self.seconds = seconds


def duration(seconds: float) -> str:
    """``10m0s``, ``1h2m5s``, ``30s``, ``0.5s``: Go's way, short and exact enough for logs."""
    if seconds < 60:
        return f"{seconds:g}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


class Action(enum.StrEnum):
    """How a message is settled with JetStream; equal to its value (``Action.ACK == "ack"``)."""

    ACK = "ack"
    NAK = "nak"
    TERM = "term"


class Kind(enum.StrEnum):
    """Why a message was settled the way it was (for logs, tests and metrics).

    Equal to its value (``Kind.SUCCESS == "success"``), so tests and logs may use either.
    """

    SUCCESS = "success"
    FAILURE = "failure"
    RETRY = "retry"
    GAVE_UP = "gave_up"
    UNDECODABLE = "undecodable"
    #: An event addressed to this driver (a pipeline step) that no handler takes: a
    #: failure result is published, or the pipeline would wait for this step forever.
    UNROUTED = "unrouted"
    #: A broadcast event (``resources.<type>``) this driver does not handle: acked quietly.
    SKIPPED = "skipped"


@attrs.frozen
class Outcome:
    """The decision for one delivery: a result to publish (or none), then an action."""

    kind: Kind
    action: Action
    result: Result | None = None
    delay: float | None = None


def backoff(attempt: int) -> float:
    """Seconds before delivery ``attempt + 1``: 1 s, 2 s, 4 s ... capped."""
    return float(min(BACKOFF_BASE * 2 ** max(attempt - 1, 0), BACKOFF_CAP))


#: What most handlers return (``None``) means; immutable, so one instance serves every run.
_SUCCEEDED = Outcome(Kind.SUCCESS, Action.ACK, Result.ok())


def from_return(value: Any) -> Outcome:
    """A handler returned: ``Result`` as is, ``None`` as success, other JSON as data."""
    if value is None:
        return _SUCCEEDED
    result = value if isinstance(value, Result) else Result.ok(data=value)
    problem = json_problem(result.data)
    if problem is not None:
        result = Result.fail(f"handler returned data that is not JSON: {problem}")
    kind = Kind.SUCCESS if result.success else Kind.FAILURE
    return Outcome(kind, Action.ACK, result)


def from_exception(
    exc: BaseException, attempt: int, max_attempts: int, earlier: tuple[str, ...] = ()
) -> Outcome:
    """A handler raised: map it to an outcome, giving up on the last attempt.

    ``earlier`` describes the attempts before this one, when the runtime knows them, so a
    final failure tells the whole story rather than only its last chapter.
    """
    if isinstance(exc, Fail):
        problem = json_problem(exc.data)
        if problem is None:
            return Outcome(Kind.FAILURE, Action.ACK, Result.fail(exc.message, exc.data))
        message = f"{exc.message} (data dropped, not JSON: {problem})"
        return Outcome(Kind.FAILURE, Action.ACK, Result.fail(message))
    if attempt >= max_attempts:
        return gave_up(attempt, describe(exc), earlier)
    if isinstance(exc, Retry):
        delay = exc.delay if exc.delay is not None else backoff(attempt)
        return Outcome(Kind.RETRY, Action.NAK, delay=max(delay, 0.0))
    return Outcome(Kind.RETRY, Action.NAK, delay=backoff(attempt))


def gave_up(attempts: int, reason: str, earlier: tuple[str, ...] = ()) -> Outcome:
    """The last attempt is spent: report the failure and end redelivery.

    With ``earlier`` (one description per attempt before the last), every attempt that
    really ran is named with its error; without it, only the last reason is known.
    """
    plural = "s" if attempts != 1 else ""
    if earlier:
        reasons = [*earlier[: attempts - 1], reason]
        reason = "; ".join(f"attempt {n}: {text}" for n, text in enumerate(reasons, 1))
    return Outcome(
        Kind.GAVE_UP,
        Action.TERM,
        Result.fail(f"gave up after {attempts} attempt{plural}: {reason}"),
    )


def describe(exc: BaseException) -> str:
    """``ValueError: bad spec``, or ``Retry: not ready`` for our own exceptions."""
    text = str(exc)
    if isinstance(exc, TimedOut):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
