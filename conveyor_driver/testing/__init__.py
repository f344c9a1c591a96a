"""Test handlers without NATS: a fake context, and the real dispatch path in memory.

from conveyor_driver.testing import FakeContext, dispatch, running

def test_build():
    ctx = FakeContext(resource={"name": "app", "resource": "pipeline", "spec": {...}})
    assert (await build(ctx)).success

async def test_routing():
    report = await dispatch(driver, {"name": "app", "resource": "pipeline"})
    assert report.action == "ack" and report.result.success

async def test_serving():  # against a real nats-server (see .fixtures for pytest's)
    async with running(driver, "nats://127.0.0.1:4222"):
        ...
"""

from .dispatch import DispatchReport, dispatch
from .fake import FakeContext
from .fake_api import Call, FakeConveyorClient
from .serve import running

__all__ = ["Call", "DispatchReport", "FakeContext", "FakeConveyorClient", "dispatch", "running"]
