"""The consumer's backlog, read from JetStream every ``--lag-interval`` seconds.

Conveyor's embedded NATS opens no monitoring port, so an autoscaler cannot read the
backlog from the server: the driver reads its consumer's info (``num_pending``,
``num_ack_pending``) and exports it on ``/metrics`` (see :mod:`conveyor_driver.exposition`).
Every instance reads the same consumer, so every instance reports the same numbers.

A reading that fails (NATS away, a leader election, the consumer gone) is weather, not an
error: the series are left out until a reading succeeds, and the watch says so once per
outage. A frozen last value would keep an autoscaler scaling on a number that is no longer
true; an absent one leaves the decision to the instances that can still read (the docs
aggregate with ``max``) or to the autoscaler's own fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from structlog.typing import FilteringBoundLogger

from .. import protocol
from ..exposition import BACKLOGS

if TYPE_CHECKING:
    from nats.aio.client import Client


class BacklogWatch:
    """Reads one consumer's backlog until :meth:`stop`.

    ``restore`` is called when the consumer is found missing (the ``lag`` mode puts it back,
    so that events are kept while no instance consumes); a consuming driver passes none,
    since its pull loop restores the consumer itself.
    """

    def __init__(
        self,
        nc: Client,
        consumer: str,
        interval: float,
        log: FilteringBoundLogger,
        *,
        restore: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._nc = nc
        self._consumer = consumer
        self._interval = interval
        self._log = log
        self._restore = restore
        self.backlog = BACKLOGS.track(protocol.MESSAGES_STREAM, consumer)
        self.last_loop = time.monotonic()
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="backlog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.backlog.clear()

    async def _watch(self) -> None:
        while True:
            self.last_loop = time.monotonic()
            await self.read()
            await asyncio.sleep(self._interval)

    async def read(self) -> None:
        """One reading; on failure the backlog is unknown until the next one succeeds."""
        js = self._nc.jetstream()
        try:
            info = await js.consumer_info(
                protocol.MESSAGES_STREAM, self._consumer, timeout=min(self._interval, 5.0)
            )
        except NotFoundError as exc:
            self._failed(exc.description or "the consumer does not exist")
            if self._restore is not None:
                with contextlib.suppress(NatsError, TimeoutError):
                    await self._restore()
            return
        except (NatsError, TimeoutError) as exc:
            self._failed(str(exc) or type(exc).__name__)
            return
        self.backlog.set(info.num_pending or 0, info.num_ack_pending or 0)
        if self._failing:
            self._failing = False
            self._log.info("backlog readable again", consumer=self._consumer)

    def _failed(self, reason: str) -> None:
        self.backlog.clear()
        if not self._failing:
            self._failing = True
            self._log.warning(
                "backlog unknown: the backlog series are left out until a reading succeeds",
                consumer=self._consumer,
                reason=reason,
            )
