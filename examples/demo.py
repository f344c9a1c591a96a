"""`make demo`: the example driver end to end, with no Conveyor server installed.

It starts an embedded nats-server with the Conveyor streams, serves the command-runner
driver against it, publishes a resource exactly as the Conveyor server would, then prints
the result event the driver reported and the run's log lines as the server would store
them. Exits 0 when the run succeeded.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from command_runner import driver

from conveyor_driver import Settings, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.models import Resource, converter
from conveyor_driver.testing import running

SAMPLE = Resource(
    name="hello-world",
    type="command",
    pipeline="demo",
    metadata={"version": "1"},
    spec={"command": "echo 'cloning repo'; sleep 0.2; echo 'building'; uname -s; echo done"},
)


def show(title: str, body: str) -> None:
    print(f"\n== {title}\n{body}", flush=True)


async def main() -> int:
    loki = Settings.from_env().loki  # CONVEYOR_LOKI_URL=... also ships the lines to Loki
    async with EmbeddedNats() as server:
        show("embedded nats-server", f"{server.url} (streams created as the Conveyor server does)")
        nc = await nats.connect(server.url)
        live: list[str] = []

        async def on_live(msg: Msg) -> None:
            live.append(orjson.loads(msg.data)["message"])

        await nc.subscribe(protocol.live_log_subjects(driver.name), cb=on_live)
        async with (
            running(driver, server.url, log_format="console", loki=loki),
            watch_results(nc) as watch,
        ):
            message = await emit_event(nc, SAMPLE)
            show("emitted", f"{SAMPLE.type}/{SAMPLE.name} run_id={message.run_id}")
            event = await watch.wait(message.run_id, timeout=60)
        # the driver has shut down here: its log lines are flushed
        body = orjson.dumps(converter.unstructure(event), option=orjson.OPT_INDENT_2).decode()
        show(f"result event on {protocol.RESULT_SUBJECT}", body)
        stored = await _stored_logs(nc, message.run_id)
        show(
            f"{len(stored)} log entries stored on {protocol.log_subject(message.run_id)}",
            "\n".join(f"{e['timestamp']}  {e['message']}" for e in stored),
        )
        show(f"{len(live)} lines seen live on live.logs.<run>.{driver.name}", "")
        await nc.close()
    return 0 if event.driverresult.success and stored else 1


async def _stored_logs(nc: Client, run_id: str) -> list[dict[str, str]]:
    """Read the run's entries as the server's logs-engine would (no server runs here)."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(protocol.log_subject(run_id), stream=protocol.LOGS_STREAM)
    entries: list[dict[str, str]] = []
    while True:
        try:
            batch = await sub.fetch(100, timeout=1)
        except TimeoutError:  # nats-py raises its own subclass, or asyncio's, when none came
            return entries
        for msg in batch:
            entries.append(orjson.loads(msg.data))
            await msg.ack()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
