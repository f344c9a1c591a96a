"""conveyor-driver: write Conveyor CI drivers as decorated Python functions.

from conveyor_driver import Driver, Context, Result

driver = Driver("command-runner")

@driver.on("pipeline")
async def build(ctx: Context) -> Result:
    ctx.log.info("cloning", repo=ctx.resource.spec["repo"])
    return Result.ok("built")
"""

from ._version import __version__
from .app import Driver, Route
from .context import Context
from .errors import ConfigurationError, ConveyorDriverError
from .models import Resource
from .outcomes import Fail, Result, Retry
from .process import CommandResult
from .settings import Settings
from .specs import InvalidSpec
from .upstream import NotFound, Upstream, UpstreamError

__all__ = [
    "CommandResult",
    "ConfigurationError",
    "Context",
    "ConveyorDriverError",
    "Driver",
    "Fail",
    "InvalidSpec",
    "NotFound",
    "Resource",
    "Result",
    "Retry",
    "Route",
    "Settings",
    "Upstream",
    "UpstreamError",
    "__version__",
]
