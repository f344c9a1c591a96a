"""Test handlers without NATS: a fake context, and the real dispatch path in memory.

from conveyor_driver.testing import FakeContext, dispatch

def test_build():
    ctx = FakeContext(resource={"name": "app", "resource": "pipeline", "spec": {...}})
    assert (await build(ctx)).success

async def test_routing():
    report = await dispatch(driver, {"name": "app", "resource": "pipeline"})
    assert report.action == "ack" and report.result.success
"""

from .dispatch import DispatchReport, dispatch
from .fake import FakeContext
from .fake_api import Call, FakeConveyorClient

__all__ = ["Call", "DispatchReport", "FakeContext", "FakeConveyorClient", "dispatch"]
