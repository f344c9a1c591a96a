"""When a failed Conveyor API call goes again, and after how long.

Only calls whose repetition leaves the server as one request would (GET, PUT, DELETE) are
retried, when the connection fails or a proxy answers 502, 503 or 504; a POST is sent
once, because a create that timed out may still have happened.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import attrs
from structlog.typing import FilteringBoundLogger

#: Methods whose repetition leaves the server as one request would.
IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "HEAD", "OPTIONS"})
#: Answers of a proxy or a server in trouble, worth another try of an idempotent call.
RETRY_STATUSES = frozenset({502, 503, 504})


@attrs.frozen
class RetryPolicy:
    """How often an idempotent call is tried, and the backoff between its attempts."""

    attempts: int = 3
    backoff: float = 0.25
    backoff_cap: float = 5.0

    def tries(self, method: str) -> int:
        """How many attempts a call with ``method`` gets in all."""
        return self.attempts if method in IDEMPOTENT else 1

    def retries_failure(self, exc: BaseException) -> bool:
        """Whether a call that got no answer is worth another attempt.

        A certificate that fails verification fails the same way next time.
        """
        return not isinstance(exc, aiohttp.ClientSSLError)

    def retries_status(self, status: int) -> bool:
        return status in RETRY_STATUSES

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed ``attempt`` (1-based).

        Half fixed, half random: the retries of many drivers spread out, yet none goes
        again at once.
        """
        ceiling = min(self.backoff_cap, self.backoff * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def pause(self, attempt: int, log: FilteringBoundLogger | None, **call: str) -> None:
        """Wait before the attempt after ``attempt``, saying so on ``log`` with ``call``."""
        delay = self.delay(attempt)
        if log is not None:
            log.warning("api call failed; retrying", **call, attempt=attempt, delay=round(delay, 3))
        await asyncio.sleep(delay)
