"""``conveyor-driver status``: a driver's consumer and run ledger as the server sees them.

Read-only and one-shot: it connects, asks JetStream for the consumer's info and the
ledger's counts, and hands back rows for the CLI to print. It never binds the consumer,
so it can run beside the driver's instances, or while none runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nats.js.errors import BucketNotFoundError, NotFoundError

from .. import protocol
from ..errors import ConveyorDriverError
from ..logs.chain import build_logger
from .connection import connect
from .ledger import RunLedger

if TYPE_CHECKING:
    import ssl

    from nats.aio.client import Client
    from structlog.typing import FilteringBoundLogger


class ConsumerNotFound(ConveyorDriverError):
    """The driver's durable consumer does not exist on this NATS."""


async def consumer_status(
    name: str, urls: tuple[str, ...], tls: ssl.SSLContext | None = None
) -> list[tuple[str, str]]:
    """(label, value) rows: backlog, in flight, redeliveries, last activity, ledger counts."""
    # A one-shot command reports its failure as one line, so the connection's own
    # "waiting for NATS" warnings stay out of its output.
    log = build_logger(level="error")
    nc = await connect(urls, name="conveyor-driver:status", log=log, tls=tls)
    try:
        try:
            info = await nc.jetstream().consumer_info(protocol.MESSAGES_STREAM, name)
        except NotFoundError:
            raise ConsumerNotFound(
                f"consumer {name!r} not found on stream {protocol.MESSAGES_STREAM!r} "
                "(has the driver run against this NATS, and does the stream exist?)"
            ) from None
        ledger = await _ledger_counts(nc, name, log)
    finally:
        await nc.close()
    config = info.config
    rows = [
        ("consumer", f"{name} on stream {protocol.MESSAGES_STREAM}"),
        ("subjects", ", ".join(config.filter_subjects or [config.filter_subject or "-"])),
        ("pending", f"{info.num_pending} waiting to be delivered"),
        ("ack pending", f"{info.num_ack_pending} delivered, not yet acknowledged"),
        ("redelivered", str(info.num_redelivered)),
        ("waiting pulls", str(info.num_waiting)),
        ("last delivery", _when(info.delivered.last_active if info.delivered else None)),
        ("last ack", _when(info.ack_floor.last_active if info.ack_floor else None)),
    ]
    if ledger is None:
        rows.append(("run ledger", f"none ({protocol.ledger_bucket(name)} does not exist)"))
    else:
        rows.append(
            (
                "run ledger",
                f"{ledger['finished']} finished, {ledger['running']} running (long runs), "
                f"{ledger['fenced']} fenced, "
                f"{ledger['skipped_as_duplicate']} skipped as duplicates",
            )
        )
    return rows


async def _ledger_counts(nc: Client, name: str, log: FilteringBoundLogger) -> dict[str, int] | None:
    try:
        kv = await nc.jetstream().key_value(protocol.ledger_bucket(name))
    except (BucketNotFoundError, NotFoundError):
        return None
    return await RunLedger(kv, log).summary()


def _when(moment: Any) -> str:
    return moment.isoformat() if moment is not None else "never"
