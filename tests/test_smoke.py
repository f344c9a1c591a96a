from nats.aio.client import Client

from conveyor_driver import Context, Driver, Result
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.models import Resource
from conveyor_driver.testing.fixtures import running


async def test_event_in_result_out(nats_server: EmbeddedNats, nats_client: Client) -> None:
    driver = Driver("smoke")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        return Result.ok("built", data={"name": ctx.resource.name})

    async with running(driver, nats_server.url), watch_results(nats_client) as watch:
        message = await emit_event(nats_client, Resource(name="app", type="pipeline"))
        event = await watch.wait(message.run_id, timeout=20)
    assert event.driverresult.success
    assert event.driverresult.data == {"name": "app"}
    assert event.driverresult.driver == "smoke"
